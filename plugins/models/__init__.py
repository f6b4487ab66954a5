"""Reference models: the paper's MLP and logistic regression."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedcore import hookimpl
from fedcore.components import Model
from fedcore.errors import SpecError


#: the widest hidden layer and the most layers an MLP may have (bigger would exhaust memory, not train)
MAX_WIDTH = 16_384
MAX_LAYERS = 64


class MLPSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    hidden: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        default_factory=lambda: [128, 64, 32], min_length=0, max_length=MAX_LAYERS
    )
    activation: str = Field("relu", pattern="^(relu|tanh|gelu)$")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Left out of the dump when default: a spec without it keeps its digest.
    binary_output: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        exclude_if=lambda value: value == "softmax",
        description="sigmoid: one output unit for a two-class task (logistic output)",
    )


class SigmoidLogits(torch.nn.Module):
    """One logit ``z`` as the two class logits ``[0, z]``: softmax of them is ``[1 - sigmoid(z), sigmoid(z)]``.

    So a single-output (sigmoid) model trains with the same cross-entropy, which here equals
    binary cross-entropy with logits, and every engine, metric and audit reads two classes.
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(z), z], dim=1)


class MLP(Model):
    """Fully connected network; softmax output via the cross-entropy loss (the paper's 128-64-32)."""

    name: ClassVar[str] = "mlp"
    Settings: ClassVar[type[BaseModel]] = MLPSettings
    description: ClassVar[str] = "multilayer perceptron (default 128-64-32, ReLU, softmax output)"

    def build(self, n_features: int, n_classes: int) -> torch.nn.Module:
        s: MLPSettings = self.settings  # type: ignore[assignment]
        act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU}[s.activation]
        layers: list[torch.nn.Module] = []
        width = n_features
        for hidden in s.hidden:
            layers += [torch.nn.Linear(width, hidden), act()]
            if s.dropout:
                layers.append(torch.nn.Dropout(s.dropout))
            width = hidden
        if s.binary_output == "sigmoid":
            if n_classes != 2:
                raise SpecError(
                    f"binary_output: sigmoid needs a two-class task; the data has {n_classes} classes",
                    where="model.settings.binary_output",
                    hint="use binary_output: softmax, or merge the classes into two (data settings)",
                )
            layers += [torch.nn.Linear(width, 1), SigmoidLogits()]
        else:
            layers.append(torch.nn.Linear(width, n_classes))
        return torch.nn.Sequential(*layers)


class LogisticRegressionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LogisticRegression(Model):
    """Multinomial logistic regression (one linear layer, softmax via the loss)."""

    name: ClassVar[str] = "logistic-regression"
    Settings: ClassVar[type[BaseModel]] = LogisticRegressionSettings
    description: ClassVar[str] = "multinomial logistic regression"

    def build(self, n_features: int, n_classes: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(n_features, n_classes))


@hookimpl
def fedcore_models() -> list[type[Model]]:
    return [MLP, LogisticRegression]
