'use strict';
// Entry point for `fabric-chaincode-node start` and for fedcore's chaincode host.
const { AuditLedgerContract } = require('./lib/audit-ledger');

module.exports.AuditLedgerContract = AuditLedgerContract;
module.exports.contracts = [AuditLedgerContract];
