"""The CNI plugin (`ciliate-cni`) and the node agent's side of it: wiring kubelet-made sandboxes."""
