"""pyhv on many hosts: the cluster store (etcd), hosts joining with a lease, ownership with
fencing, placement, the cluster balancer and the fleet simulator (docs/cluster.md)."""
