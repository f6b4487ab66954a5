'use strict';
// Unit tests of the contract on fabric-shim's real ChaincodeStub (composite keys,
// range iteration), with the peer side answered by SimulationHandler.
const test = require('node:test');
const assert = require('node:assert');
const { peer } = require('@hyperledger/fabric-protos');
const ChaincodeStub = require('fabric-shim/lib/stub');
const { AuditLedgerContract, commonName } = require('../lib/audit-ledger');
const { SimulationHandler } = require('../simulation-handler');

const DIGEST = 'a'.repeat(64);

function context(state, txId, cn) {
    const handler = new SimulationHandler(state, 'fedcore-ledger');
    const stub = new ChaincodeStub(handler, 'fedcore', txId, new peer.ChaincodeInput(), undefined);
    stub.txTimestamp = { getSeconds: () => 1700000000, getNanos: () => 5e8 };
    const clientIdentity = { getID: () => `x509::/C=US/O=fedcore/CN=${cn}::/CN=ca.fedcore`, getMSPID: () => 'Org1MSP' };
    return { ctx: { stub, clientIdentity }, handler };
}

function commit(state, handler, version) {
    for (const { key, value } of handler.rwset().writes) {
        state.set(key, { value: Buffer.from(value, 'base64'), version });
    }
}

test('records entries of the submitting identity and reads them by run and round', async () => {
    const contract = new AuditLedgerContract();
    const state = new Map();
    const rounds = [[1, 'site-0'], [1, 'site-1'], [2, 'site-0']];
    for (const [i, [round, writer]] of rounds.entries()) {
        const { ctx, handler } = context(state, `tx${i}`, writer);
        const entries = [{ round, kind: 'site-update', writer, payloadSha256: DIGEST, metadata: { n_samples: 10 } }];
        const stored = JSON.parse(await contract.RecordEntries(ctx, 'run-1', JSON.stringify(entries)));
        assert.strictEqual(stored[0].txId, `tx${i}`);
        assert.strictEqual(stored[0].timestamp, 1700000000500);
        commit(state, handler, `${i}:0`);
    }
    const { ctx } = context(state, 'q', 'site-0');
    const roundOne = JSON.parse(await contract.GetEntries(ctx, 'run-1', '1'));
    assert.deepStrictEqual(roundOne.map((e) => e.writer), ['site-0', 'site-1']);
    const all = JSON.parse(await contract.GetRunEntries(ctx, 'run-1'));
    assert.deepStrictEqual(all.map((e) => e.round), [1, 1, 2]);
    assert.deepStrictEqual(JSON.parse(await contract.GetRunEntries(ctx, 'run-2')), []);
});

test('refuses an entry written in another identity\'s name', async () => {
    const { ctx } = context(new Map(), 'tx', 'site-0');
    const entries = [{ round: 1, kind: 'site-update', writer: 'site-1', payloadSha256: DIGEST }];
    await assert.rejects(contract().RecordEntries(ctx, 'run', JSON.stringify(entries)), /not the submitting identity/);
});

test('refuses malformed digests, kinds, rounds and JSON', async () => {
    const { ctx } = context(new Map(), 'tx', 'server');
    const bad = [
        [{ round: 1, kind: 'aggregate', writer: 'server', payloadSha256: 'XYZ' }, /64 lowercase hex/],
        [{ round: 1, kind: 'weights', writer: 'server', payloadSha256: DIGEST }, /unknown kind/],
        [{ round: -1, kind: 'aggregate', writer: 'server', payloadSha256: DIGEST }, /non-negative integer/],
    ];
    for (const [entry, error] of bad) {
        await assert.rejects(contract().RecordEntries(ctx, 'run', JSON.stringify([entry])), error);
    }
    await assert.rejects(contract().RecordEntries(ctx, 'run', '{not json'), /not valid JSON/);
    await assert.rejects(contract().RecordEntries(ctx, 'run', '[]'), /non-empty/);
});

test('reads the common name from the client identity', () => {
    assert.strictEqual(commonName('x509::CN=site-2,OU=client,O=Hospital::CN=ca'), 'site-2');
    assert.strictEqual(commonName('x509::/C=US/CN=server::/CN=ca'), 'server');
});

function contract() {
    return new AuditLedgerContract();
}
