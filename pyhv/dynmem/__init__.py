"""Dynamic Memory: the VSP, the protocol and the balancer."""
