"""Service load balancing in the datapath: socket LB (cgroup hooks) and tc NodePort LB."""
