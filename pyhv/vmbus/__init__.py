"""VMBus: channels between service providers (VSPs) in the host and clients (VSCs) in the guest.

Ring buffers in guest memory with the VMBus ring layout (`ring`), the VMBus packet format
(`packet`), a channel = a pair of rings plus signalling (`channel`), the controller through which
the guest learns of offers and opens channels (`controller`), and the VSP state-machine base
(`vsp`). See docs/vmbus.md.
"""
