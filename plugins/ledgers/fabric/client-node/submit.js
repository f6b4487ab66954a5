'use strict';
/*
 * Reference check of FakeFabricGateway with the official Fabric Gateway client
 * (@hyperledger/fabric-gateway 1.11): submit RecordEntries, read it back with
 * GetEntries, print a JSON line. With --tamper-signature every signature the
 * client produces has one bit flipped: the gateway must refuse it (exit 3).
 *
 *   node submit.js HOST:PORT MSP_ID CERT.pem KEY.pem WRITER [--tamper-signature]
 */
const crypto = require('node:crypto');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const { connect, signers } = require('@hyperledger/fabric-gateway');

async function main() {
    const [endpoint, mspId, certPath, keyPath, writer, flag] = process.argv.slice(2);
    const sign = signers.newPrivateKeySigner(crypto.createPrivateKey(fs.readFileSync(keyPath)));
    const signer = flag === '--tamper-signature'
        ? async (digest) => { const s = Buffer.from(await sign(digest)); s[s.length - 1] ^= 0x01; return s; }
        : sign;
    const client = new grpc.Client(endpoint, grpc.credentials.createInsecure());
    const gateway = connect({
        client,
        identity: { mspId, credentials: fs.readFileSync(certPath) },
        signer,
        hash: (message) => crypto.createHash('sha256').update(message).digest(),
    });
    try {
        const contract = gateway.getNetwork('fedcore').getContract('fedcore-ledger');
        const runId = `node-${Date.now()}`;
        const entries = [{ round: 1, kind: 'site-update', writer, payloadSha256: 'cd'.repeat(32), metadata: { client: 'fabric-gateway' } }];
        const proposal = contract.newProposal('RecordEntries', { arguments: [runId, JSON.stringify(entries)] });
        const transaction = await proposal.endorse();
        const commit = await transaction.submit();
        const status = await commit.getStatus();
        const read = JSON.parse(Buffer.from(await contract.evaluateTransaction('GetEntries', runId, '1')).toString());
        console.log(JSON.stringify({
            txId: transaction.getTransactionId(), status: status.successful ? 'VALID' : String(status.code),
            blockNumber: Number(status.blockNumber), entries: read,
        }));
        process.exitCode = status.successful ? 0 : 4;
    } catch (err) {
        const details = (err.details || []).map((d) => d.message).join('; ');
        console.log(`rejected: ${err.name}: ${err.message} ${details} code=${err.code}`);
        process.exitCode = 3;
    } finally {
        gateway.close();
        client.close();
    }
}

main();
