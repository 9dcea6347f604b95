// dcmjs-dimse as a DICOM peer for the node's tests: one operation per run, its outcome as one JSON line.
//
//   node peer.js echo  HOST PORT CALLED
//   node peer.js store HOST PORT CALLED FILE...
//   node peer.js find  HOST PORT CALLED KEYS_JSON            (Study Root, STUDY level)
//   node peer.js get   HOST PORT CALLED STUDY_UID OUT_DIR
//   node peer.js move  HOST PORT CALLED STUDY_UID OUT_DIR SCP_PORT   (this peer is the destination, AE DCMJS)
//
// Output: {"statuses": [...every response status...], "errors": [...ErrorComment...], "datasets": [...C-FIND
// identifiers...], "files": [...files written...]}.
'use strict';

const path = require('path');
const dimse = require('dcmjs-dimse');

const { Client, Server, Scp } = dimse;
dimse.log.setLevel('error');
const { CEchoRequest, CStoreRequest, CFindRequest, CGetRequest, CMoveRequest } = dimse.requests;
const { CStoreResponse } = dimse.responses;
const { Status, PresentationContextResult, TransferSyntax } = dimse.constants;

const AE_TITLE = 'DCMJS';
const [operation, host, port, called, ...rest] = process.argv.slice(2);
const outcome = { statuses: [], errors: [], datasets: [], files: [] };

function record(response) {
  outcome.statuses.push(response.getStatus());
  const comment = response.getErrorComment ? response.getErrorComment() : undefined;
  if (comment) outcome.errors.push(comment);
  if (operation === 'find' && response.getStatus() === Status.Pending && response.hasDataset()) {
    outcome.datasets.push(response.getDataset().getElements());
  }
}

function keep(dataset, folder) {
  const file = path.join(folder, `${dataset.getElement('SOPInstanceUID')}.dcm`);
  dataset.toFile(file);
  outcome.files.push(file);
}

class StoreScp extends Scp {
  // The C-MOVE destination: accepts every storage context in its first offered syntax, keeps what comes.
  associationRequested(association) {
    this.association = association;
    association.getPresentationContexts().forEach((c) => {
      const context = association.getPresentationContext(c.id);
      context.setResult(PresentationContextResult.Accept, context.getTransferSyntaxUids()[0]);
    });
    this.sendAssociationAccept();
  }

  cStoreRequest(request, callback) {
    keep(request.getDataset(), rest[1]);
    const response = CStoreResponse.fromRequest(request);
    response.setStatus(Status.Success);
    callback(response);
  }

  associationReleaseRequested() {
    this.sendAssociationReleaseResponse();
  }
}

function request() {
  switch (operation) {
    case 'echo':
      return [new CEchoRequest()];
    case 'store':
      return rest.map((file) => {
        const store = new CStoreRequest(file);
        store.setAdditionalTransferSyntaxes(Object.values(TransferSyntax));
        return store;
      });
    case 'find':
      return [CFindRequest.createStudyFindRequest(JSON.parse(rest[0]))];
    case 'get':
      return [CGetRequest.createStudyGetRequest(rest[0])];
    case 'move':
      return [CMoveRequest.createStudyMoveRequest(AE_TITLE, rest[0])];
    default:
      throw new Error(`unknown operation ${operation}`);
  }
}

const client = new Client();
let server;
if (operation === 'move') {
  server = new Server(StoreScp);
  server.listen(Number(rest[2]));
}
if (operation === 'get') {
  client.on('cStoreRequest', (storeRequest, callback) => {
    keep(storeRequest.getDataset(), rest[1]);
    const response = CStoreResponse.fromRequest(storeRequest);
    response.setStatus(Status.Success);
    callback(response);
  });
}
for (const r of request()) {
  r.on('response', record);
  client.addRequest(r);
}
client.on('networkError', (e) => {
  outcome.errors.push(`network error: ${e.message || e}`);
});
client.on('closed', () => {
  if (server) server.close();
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
});
client.send(host, Number(port), AE_TITLE, called);
