/* vmbus.h -- the guest's VMBus client: pyhv's port-I/O controller (docs/vmbus.md) for offers and
 * open/close, and ring buffers with the Hyper-V layout and packet format (reference/vmbus.md 3.1). */
#ifndef VMBUS_H
#define VMBUS_H
#include "kernel.h"

#define VMBUS_PORT 0x0E00
#define VMBUS_MAX_CHANNELS 8
#define VMBUS_RECV_MAX 4096 /* largest payload a channel user takes (DM: one page) */

/* one direction: the host's view is in pyhv/vmbus/ring.py */
struct hv_ring_ctl {
    volatile u32 write_index, read_index, interrupt_mask, pending_send_sz;
    u32 reserved1[12];
    volatile u32 feature_bits;
};

struct vmbus_ring {
    struct hv_ring_ctl *ctl; /* the shared control page */
    u8 *data;
    u32 size;  /* data bytes */
    u32 index; /* our own copy of the index we own (write for out, read for in) */
};

struct vmbus_channel;
typedef void (*vmbus_callback_t)(struct vmbus_channel *ch);

struct vmbus_channel {
    u8 if_type[16], if_instance[16];
    u32 relid, offer_flags, ring_data_bytes, doorbell_port;
    int open;
    u32 vector;
    u64 ring_gpa;
    u32 ring_pages, downstream_pages;
    struct vmbus_ring out, in; /* guest->host, host->guest */
    vmbus_callback_t callback; /* run by the poll hook while the channel is open */
    int pending_send;          /* we set pending_send_sz on the host's read side */
    volatile u64 interrupts;
    u64 tx_packets, rx_packets, doorbells, ring_full, rx_skipped, rx_too_big, wakeups;
    u64 rekicks;             /* doorbells rung again for packets the host left unread */
    u32 stall_read;          /* host's read index of the guest->host ring last seen ... */
    u64 stall_tick;          /* ... and since when */
    const char *close_reason; /* why the guest closed it (a ring the host broke) */
};

extern struct vmbus_channel vmbus_channels[VMBUS_MAX_CHANNELS];
extern u32 vmbus_nchannels;
extern int vmbus_present;

int vmbus_init(void); /* probe the controller and read the offers; 0 if found */
struct vmbus_channel *vmbus_find(const u8 if_type[16]);
/* allocate the ring area (data_bytes per direction, a multiple of 4 KiB), open with `vector` */
int vmbus_open(struct vmbus_channel *ch, u32 data_bytes, u32 vector, vmbus_callback_t cb);
void vmbus_close(struct vmbus_channel *ch, const char *why);
/* one inband packet; 0 sent, -1 ring full (the host signals when there is room: retry from the
 * callback), -2 never fits or the channel is closed */
int vmbus_send(struct vmbus_channel *ch, const void *payload, u32 len, u64 trans_id);
/* the next packet's payload (with its pad to 8 bytes) into buf: 1 got one, 0 ring empty, -1 the
 * channel broke (closed). Packets of other types than inband data, or too big, are skipped. */
int vmbus_recv(struct vmbus_channel *ch, void *buf, u32 bufsize, u32 *len, u64 *trans_id);
/* after draining: unmask host interrupts; returns 1 if more data arrived meanwhile */
int vmbus_recv_done(struct vmbus_channel *ch);
void vmbus_poll(void);
void vmbus_show(void);

/* dmvsc.c */
void dmvsc_init(void);
void dmvsc_show(void);

#endif
