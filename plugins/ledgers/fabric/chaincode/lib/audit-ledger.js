'use strict';
/*
 * fedcore audit-ledger chaincode. Records digests of federated-learning artefacts
 * (never the artefacts) and reads them back by run and round.
 *
 * Key: composite key ('entry', runId, round as 8 digits, txId, index), so a range
 * read by (runId) or (runId, round) returns entries by round, then transaction id.
 * The entry's writer must be the transaction creator (the CN of its certificate):
 * Fabric has already checked the creator's signature, so a hospital cannot
 * record an update in another hospital's name.
 */
const { Contract } = require('fabric-contract-api');

const HEX64 = /^[0-9a-f]{64}$/;
const KINDS = new Set(['spec', 'preprocessing', 'site-update', 'aggregate', 'global-model', 'privacy-spent', 'dropout', 'run-end', 'resume']);

function stableStringify(value) {
    // Sorted keys, no whitespace: the same bytes on every endorsing peer.
    if (Array.isArray(value)) {
        return '[' + value.map(stableStringify).join(',') + ']';
    }
    if (value && typeof value === 'object') {
        return '{' + Object.keys(value).sort().map((k) => JSON.stringify(k) + ':' + stableStringify(value[k])).join(',') + '}';
    }
    return JSON.stringify(value);
}

function commonName(id) {
    // ClientIdentity.getID(): 'x509::<subject DN>::<issuer DN>'
    const subject = id.split('::')[1] || '';
    const match = /(?:^|\/|,)\s*CN=([^,/]+)/.exec(subject);
    return match ? match[1] : '';
}

function roundKey(round) {
    return String(round).padStart(8, '0');
}

class AuditLedgerContract extends Contract {
    constructor() {
        super('fedcore.ledger');
    }

    /**
     * Record a batch of entries written by the transaction's creator, atomically.
     * @param {string} runId the run (ledger) identifier
     * @param {string} entriesJson JSON array of {round, kind, writer, payloadSha256, metadata}
     * @returns {string} JSON array of the stored entries
     */
    async RecordEntries(ctx, runId, entriesJson) {
        if (!runId || runId.length > 128) {
            throw new Error('runId must be 1 to 128 characters');
        }
        let entries;
        try {
            entries = JSON.parse(entriesJson);
        } catch (err) {
            throw new Error('entries are not valid JSON');
        }
        if (!Array.isArray(entries) || entries.length === 0) {
            throw new Error('entries must be a non-empty JSON array');
        }
        const creator = commonName(ctx.clientIdentity.getID());
        const mspId = ctx.clientIdentity.getMSPID();
        const txId = ctx.stub.getTxID();
        const ts = ctx.stub.getTxTimestamp();
        const timestamp = Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6);
        const stored = [];
        for (let index = 0; index < entries.length; index++) {
            const e = entries[index];
            if (!Number.isInteger(e.round) || e.round < 0) {
                throw new Error(`entry ${index}: round must be a non-negative integer`);
            }
            if (!KINDS.has(e.kind)) {
                throw new Error(`entry ${index}: unknown kind '${e.kind}'`);
            }
            if (typeof e.payloadSha256 !== 'string' || !HEX64.test(e.payloadSha256)) {
                throw new Error(`entry ${index}: payloadSha256 must be 64 lowercase hex digits`);
            }
            if (e.writer !== creator) {
                throw new Error(`entry ${index}: writer '${e.writer}' is not the submitting identity '${creator}'`);
            }
            const key = ctx.stub.createCompositeKey('entry', [runId, roundKey(e.round), txId, String(index).padStart(4, '0')]);
            const entry = {
                runId, round: e.round, kind: e.kind, writer: e.writer, payloadSha256: e.payloadSha256,
                metadata: e.metadata || {}, txId, index, mspId, timestamp,
            };
            await ctx.stub.putState(key, Buffer.from(stableStringify(entry)));
            stored.push(entry);
        }
        return stableStringify(stored);
    }

    /** Entries of one round of a run, ordered by transaction id. */
    async GetEntries(ctx, runId, round) {
        if (!/^[0-9]+$/.test(String(round))) {
            throw new Error('round must be a non-negative integer');
        }
        return this._range(ctx, [runId, roundKey(Number(round))]);
    }

    /** Every entry of a run, by round then transaction id. */
    async GetRunEntries(ctx, runId) {
        return this._range(ctx, [runId]);
    }

    async _range(ctx, attributes) {
        const out = [];
        for await (const { value } of ctx.stub.getStateByPartialCompositeKey('entry', attributes)) {
            out.push(JSON.parse(Buffer.from(value).toString('utf8')));
        }
        return stableStringify(out);
    }
}

module.exports = { AuditLedgerContract, stableStringify, commonName };
