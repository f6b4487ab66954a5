'use strict';
/*
 * fedcore's chaincode host for FakeFabricGateway: runs this directory's real
 * contract (fabric-contract-api, dispatched by fabric-shim's ChaincodeFromContract)
 * on a real ChaincodeStub built from the client's signed proposal, and returns
 * the chaincode response with its read/write set. JSON lines on stdin/stdout:
 *   {"op":"invoke","channel":C,"txId":T,"signedProposal":B64} -> {"status","message","payload":B64,"rwset":{...}}
 *   {"op":"commit","writes":[{"key","value":B64|null,"version"}]} -> {"ok":true}
 */
const path = require('path');
const readline = require('readline');
const { peer, common } = require('@hyperledger/fabric-protos');
const ChaincodeStub = require('fabric-shim/lib/stub');
const Bootstrap = require('fabric-shim/lib/contract-spi/bootstrap');
const ChaincodeFromContract = require('fabric-shim/lib/contract-spi/chaincodefromcontract');
const { SimulationHandler } = require('./simulation-handler');

const info = Bootstrap.getInfoFromContract(path.resolve(__dirname));
const chaincode = new ChaincodeFromContract(info.contracts, info.serializers, {}, info.title, info.version);
const state = new Map();

function chaincodeInput(signedProposal) {
    const proposal = peer.Proposal.deserializeBinary(signedProposal.getProposalBytes_asU8());
    const payload = peer.ChaincodeProposalPayload.deserializeBinary(proposal.getPayload_asU8());
    const spec = peer.ChaincodeInvocationSpec.deserializeBinary(payload.getInput_asU8());
    const header = common.Header.deserializeBinary(proposal.getHeader_asU8());
    const channelHeader = common.ChannelHeader.deserializeBinary(header.getChannelHeader_asU8());
    const extension = peer.ChaincodeHeaderExtension.deserializeBinary(channelHeader.getExtension_asU8());
    return { input: spec.getChaincodeSpec().getInput(), namespace: extension.getChaincodeId().getName() };
}

async function invoke(request) {
    const signedProposal = peer.SignedProposal.deserializeBinary(Buffer.from(request.signedProposal, 'base64'));
    const { input, namespace } = chaincodeInput(signedProposal);
    const handler = new SimulationHandler(state, namespace);
    const stub = new ChaincodeStub(handler, request.channel, request.txId, input, signedProposal);
    const response = await chaincode.Invoke(stub);
    return {
        status: response.status,
        message: response.message || '',
        payload: Buffer.from(response.payload || []).toString('base64'),
        rwset: handler.rwset(),
    };
}

function commit(request) {
    for (const { key, value, version } of request.writes) {
        if (value === null) {
            state.delete(key);
        } else {
            state.set(key, { value: Buffer.from(value, 'base64'), version });
        }
    }
    return { ok: true };
}

const lines = readline.createInterface({ input: process.stdin });
let queue = Promise.resolve();
lines.on('line', (line) => {
    // One request at a time, in order: the peer serializes simulation against committed state.
    queue = queue.then(async () => {
        let reply;
        try {
            const request = JSON.parse(line);
            reply = request.op === 'commit' ? commit(request) : await invoke(request);
        } catch (err) {
            reply = { status: 500, message: `chaincode host: ${err.message}`, payload: '', rwset: { reads: [], rangeReads: [], writes: [] } };
        }
        // Prefixed, so that any shim log lines on stdout cannot be taken for a reply.
        process.stdout.write('@@fedcore ' + JSON.stringify(reply) + '\n');
    });
});
