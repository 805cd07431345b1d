"""The user-facing contract every part agrees on: names, the spec, the CRD, the import Secret and its
kubeconfig, export policy, federated-source records. Pure: no API call, no clock, no I/O."""
