"""Reference privacy plugins."""
