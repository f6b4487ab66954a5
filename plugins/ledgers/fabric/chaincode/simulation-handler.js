'use strict';
/*
 * Stands in for the peer side of the chaincode stream (fabric-shim's handler):
 * answers the real ChaincodeStub's state requests from a committed world-state
 * snapshot and records the read/write set, as a peer simulating a proposal does.
 * Reads see committed state only (Fabric does not read a transaction's own writes).
 */
const { peer, ledger } = require('@hyperledger/fabric-protos');
const { StateQueryIterator } = require('fabric-shim/lib/iterators');

function byteOrder(a, b) {
    return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

class SimulationHandler {
    /** @param {Map<string, {value: Buffer, version: string}>} state committed world state of one namespace */
    constructor(state, namespace) {
        this.state = state;
        this.namespace = namespace;
        this.reads = new Map();
        this.writes = new Map();
        this.rangeReads = [];
    }

    _public(collection) {
        if (collection) {
            throw new Error('private data collections are not supported by this ledger');
        }
    }

    async handleGetState(collection, key) {
        this._public(collection);
        const current = this.state.get(key);
        this.reads.set(key, current ? current.version : null);
        return current ? Buffer.from(current.value) : Buffer.alloc(0);
    }

    async handlePutState(collection, key, value) {
        this._public(collection);
        this.writes.set(key, Buffer.from(value));
    }

    async handleDeleteState(collection, key) {
        this._public(collection);
        this.writes.set(key, null);
    }

    async handleGetStateByRange(collection, startKey, endKey) {
        this._public(collection);
        const keys = [...this.state.keys()]
            .filter((k) => byteOrder(k, startKey) >= 0 && (endKey === '' || byteOrder(k, endKey) < 0))
            .sort(byteOrder);
        this.rangeReads.push({ startKey, endKey, keys: keys.map((k) => [k, this.state.get(k).version]) });
        const response = new peer.QueryResponse();
        response.setResultsList(keys.map((k) => {
            const kv = new ledger.queryresult.KV();
            kv.setNamespace(this.namespace);
            kv.setKey(k);
            kv.setValue(this.state.get(k).value);
            const bytes = new peer.QueryResultBytes();
            bytes.setResultbytes(kv.serializeBinary());
            return bytes;
        }));
        response.setHasMore(false);
        response.setId(`range-${this.rangeReads.length}`);
        return { iterator: new StateQueryIterator(this, '', '', response) };
    }

    async handleQueryStateClose() {
        return new peer.QueryResponse();
    }

    rwset() {
        return {
            reads: [...this.reads.entries()].map(([key, version]) => ({ key, version })),
            rangeReads: this.rangeReads,
            writes: [...this.writes.entries()].map(([key, value]) => ({ key, value: value === null ? null : value.toString('base64') })),
        };
    }
}

module.exports = { SimulationHandler, byteOrder };
