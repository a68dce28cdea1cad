/* vmbus.c -- the guest's VMBus client.
 *
 * Set-up goes through pyhv's VMBus controller, a register file on ports 0x0E00-0x0E33 (docs/vmbus.md):
 * read the offers, open a channel by giving the GPA of a ring area and an interrupt vector. The rings
 * are the Hyper-V ones (reference/vmbus.md 3.1), byte for byte: [guest->host ring][host->guest ring],
 * each a control page then data; packets are a 16-byte descriptor, the payload, a zero pad to 8 bytes
 * and an 8-byte trailer.
 *
 * Rules kept here: each live index is one aligned volatile u32 load or store; our copies of the data
 * are done before the index that publishes them, with a full barrier (a locked instruction: the CPL0
 * emulator has no mfence) between publishing our index and reading the host's; the ring is never
 * filled completely; the host is signalled only when its ring goes empty -> non-empty and it has not
 * masked interrupts, or (as consumer) when it waits for room we just freed (pending_send_sz). Every
 * index and length the host writes is checked before use: a bad one closes the channel. */
#include "vmbus.h"

#define REG_ID 0x00
#define REG_VERSION 0x04
#define REG_OFFER_COUNT 0x08
#define REG_SELECT 0x0C
#define REG_OFFER_DATA 0x10
#define REG_RING_GPA_LO 0x14
#define REG_RING_GPA_HI 0x18
#define REG_RING_PAGES 0x1C
#define REG_DOWNSTREAM_PAGES 0x20
#define REG_VECTOR 0x24
#define REG_COMMAND 0x28
#define REG_STATUS 0x2C
#define REG_DOORBELL 0x30
#define REG_SPAN 0x34
#define CONTROLLER_ID 0x43424D56u
#define CMD_OPEN 1
#define CMD_CLOSE 2
#define MAX_RING_PAGES 256
#define PKT_DATA_INBAND 6
#define INBAND_OFFSET8 2
#define DESC_SIZE 16
#define TRAILER_SIZE 8
#define FEAT_PENDING_SEND_SZ 1

struct vmbus_channel vmbus_channels[VMBUS_MAX_CHANNELS];
u32 vmbus_nchannels;
int vmbus_present;
static u32 offer_count;

static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1,%0" : "=a"(v) : "Nd"(p)); return v; }
/* a full barrier: a locked read-modify-write (mfence would stop the CPL0 emulator) */
static inline void full_barrier(void) { __asm__ volatile("lock orl $0,(%%rsp)" ::: "memory", "cc"); }
static u32 reg_r(u32 off) { return inl((u16)(VMBUS_PORT + off)); }
static void reg_w(u32 off, u32 v) { outl((u16)(VMBUS_PORT + off), v); }

/* copies of multiples of 8 bytes: one string instruction instead of a loop of emulated ones */
static void copy8(void *d, const void *s, u64 n)
{
    u64 cnt = n / 8;
    __asm__ volatile("rep movsq" : "+D"(d), "+S"(s), "+c"(cnt)::"memory");
}

static u32 ring_put(struct vmbus_ring *r, u32 off, const void *src, u32 n)
{
    u32 k = r->size - off;
    if (n < k) {
        copy8(r->data + off, src, n);
        return off + n;
    }
    copy8(r->data + off, src, k);
    copy8(r->data, (const u8 *)src + k, n - k);
    return n - k;
}

static void ring_get(const struct vmbus_ring *r, u32 off, void *dst, u32 n)
{
    u32 k = r->size - off;
    if (n <= k) {
        copy8(dst, r->data + off, n);
        return;
    }
    copy8(dst, r->data + off, k);
    copy8((u8 *)dst + k, r->data, n - k);
}

static u32 to_read(const struct vmbus_ring *r, u32 w, u32 rd) { return w >= rd ? w - rd : r->size - (rd - w); }
static int bad_index(const struct vmbus_ring *r, u32 v) { return v >= r->size || (v & 7); }

static void doorbell(struct vmbus_channel *ch)
{
    ch->doorbells++;
    outl((u16)ch->doorbell_port, ch->relid);
}

/* ---------------------------------------------------------------- controller */
static void vmbus_irq(struct frame *f)
{
    for (u32 i = 0; i < vmbus_nchannels; i++)
        if (vmbus_channels[i].vector == f->vec)
            vmbus_channels[i].interrupts++;
}

int vmbus_init(void)
{
    if (reg_r(REG_ID) != CONTROLLER_ID)
        return -1;
    u32 version = reg_r(REG_VERSION);
    if (version != 1)
        printf("vmbus: controller version %u, this guest knows 1: trying anyway\n", version);
    vmbus_present = 1;
    offer_count = reg_r(REG_OFFER_COUNT);
    u32 n = offer_count < VMBUS_MAX_CHANNELS ? offer_count : VMBUS_MAX_CHANNELS;
    for (u32 i = 0; i < n; i++) {
        u32 rec[16];
        reg_w(REG_SELECT, i);
        for (u32 k = 0; k < 16; k++)
            rec[k] = reg_r(REG_OFFER_DATA);
        struct vmbus_channel *ch = &vmbus_channels[vmbus_nchannels];
        memcpy(ch->if_type, &rec[0], 16);
        memcpy(ch->if_instance, &rec[4], 16);
        ch->relid = rec[8];
        ch->offer_flags = rec[9];
        ch->ring_data_bytes = rec[10];
        ch->doorbell_port = rec[11];
        if (ch->relid != i + 1) { /* the controller numbers offers from 1 */
            printf("vmbus: offer %u has child_relid %u (want %u): ignored\n", i, ch->relid, i + 1);
            continue;
        }
        if (ch->doorbell_port < VMBUS_PORT || ch->doorbell_port >= VMBUS_PORT + REG_SPAN)
            ch->doorbell_port = VMBUS_PORT + REG_DOORBELL;
        vmbus_nchannels++;
    }
    if (offer_count > VMBUS_MAX_CHANNELS)
        printf("vmbus: %u offers, this guest reads the first %u\n", offer_count, VMBUS_MAX_CHANNELS);
    kernel_add_poll(vmbus_poll);
    return 0;
}

struct vmbus_channel *vmbus_find(const u8 if_type[16])
{
    for (u32 i = 0; i < vmbus_nchannels; i++) {
        u32 k = 0;
        while (k < 16 && vmbus_channels[i].if_type[k] == if_type[k])
            k++;
        if (k == 16)
            return &vmbus_channels[i];
    }
    return NULL;
}

/* `pages` physically contiguous pages; short runs met on the way are held, then given back */
static u64 alloc_contiguous(u64 pages)
{
    struct pmm_range held[8], r;
    u32 nheld = 0, n;
    u64 base = 0;
    while (nheld < 8) {
        u64 got = pmm_alloc(pages, &r, 1, &n);
        if (got == pages) {
            base = r.base;
            break;
        }
        if (!got)
            break;
        held[nheld++] = r;
    }
    for (u32 i = 0; i < nheld; i++)
        pmm_free(held[i].base, held[i].pages);
    return base;
}

static void ring_setup(struct vmbus_ring *r, u64 gpa, u32 pages)
{
    r->ctl = (struct hv_ring_ctl *)gpa;
    r->data = (u8 *)gpa + PAGE_SIZE;
    r->size = (pages - 1) * PAGE_SIZE;
    r->index = 0;
    /* pmm pages are not zeroed: the control page's fields are ours to set before OPEN */
    r->ctl->write_index = 0;
    r->ctl->read_index = 0;
    r->ctl->interrupt_mask = 0;
    r->ctl->pending_send_sz = 0;
    for (u32 i = 0; i < 12; i++)
        r->ctl->reserved1[i] = 0;
    r->ctl->feature_bits = FEAT_PENDING_SEND_SZ; /* as Linux: we honour pending_send_sz */
}

static const char *const status_names[] = {"OK", "BAD_OFFER", "BAD_STATE", "BAD_RING", "BAD_GPA", "BAD_COMMAND"};

int vmbus_open(struct vmbus_channel *ch, u32 data_bytes, u32 vector, vmbus_callback_t cb)
{
    u32 idx = (u32)(ch - vmbus_channels);
    if (ch->open)
        return -1;
    if (data_bytes == 0 || data_bytes % PAGE_SIZE || 2 * (data_bytes / PAGE_SIZE + 1) > MAX_RING_PAGES) {
        printf("vmbus: channel %u: ring of %u data bytes per direction is not 4 KiB pages up to 508 KiB\n",
               ch->relid, data_bytes);
        return -1;
    }
    u32 half = data_bytes / PAGE_SIZE + 1, pages = 2 * half;
    static u8 registered[256];
    if (!registered[vector & 255]) {
        if (irq_register(vector, vmbus_irq)) {
            printf("vmbus: channel %u: interrupt vector %x is taken\n", ch->relid, vector);
            return -1;
        }
        registered[vector & 255] = 1;
    }
    u64 gpa = alloc_contiguous(pages);
    if (!gpa) {
        printf("vmbus: channel %u: no %u contiguous pages for the rings\n", ch->relid, pages);
        return -1;
    }
    pmm_commit(pages);
    ring_setup(&ch->out, gpa, half);
    ring_setup(&ch->in, gpa + half * PAGE_SIZE, half);
    ch->ring_gpa = gpa;
    ch->ring_pages = pages;
    ch->downstream_pages = half;
    ch->vector = vector;
    ch->callback = cb;
    ch->pending_send = 0;
    ch->close_reason = NULL;
    ch->stall_read = 0;
    ch->stall_tick = ticks;
    full_barrier();
    reg_w(REG_SELECT, idx);
    reg_w(REG_RING_GPA_LO, (u32)gpa);
    reg_w(REG_RING_GPA_HI, (u32)(gpa >> 32));
    reg_w(REG_RING_PAGES, pages);
    reg_w(REG_DOWNSTREAM_PAGES, half);
    reg_w(REG_VECTOR, vector);
    ch->open = 1; /* before OPEN: the host may interrupt at once */
    reg_w(REG_COMMAND, CMD_OPEN);
    u32 st = reg_r(REG_STATUS);
    if (st != 0) {
        ch->open = 0;
        printf("vmbus: channel %u: OPEN refused: %s (%u)\n", ch->relid, st < 6 ? status_names[st] : "?", st);
        pmm_free(gpa, pages);
        pmm_uncommit(pages);
        ch->ring_gpa = 0;
        return -1;
    }
    return 0;
}

void vmbus_close(struct vmbus_channel *ch, const char *why)
{
    if (!ch->open)
        return;
    ch->open = 0;
    ch->close_reason = why;
    reg_w(REG_SELECT, (u32)(ch - vmbus_channels));
    reg_w(REG_COMMAND, CMD_CLOSE);
    u32 st = reg_r(REG_STATUS);
    printf("vmbus: channel %u closed: %s\n", ch->relid, why);
    if (st == 0 || st == 2) { /* closed now, or the host had closed it already: the rings are ours */
        pmm_free(ch->ring_gpa, ch->ring_pages);
        pmm_uncommit(ch->ring_pages);
        ch->ring_gpa = 0;
    } /* else leave the pages allocated: the host may still be using them */
}

/* ---------------------------------------------------------------- rings */
int vmbus_send(struct vmbus_channel *ch, const void *payload, u32 len, u64 trans_id)
{
    if (!ch->open)
        return -2;
    struct vmbus_ring *r = &ch->out;
    u32 plen = (DESC_SIZE + len + 7) & ~7u, total = plen + TRAILER_SIZE;
    if (len > r->size || total >= r->size)
        return -2;
    u32 old = r->index, rd = r->ctl->read_index;
    if (bad_index(r, rd)) {
        vmbus_close(ch, "the host wrote a bad read_index in the guest->host ring");
        return -2;
    }
    if (r->size - to_read(r, old, rd) <= total) { /* "only room for the packet" is full too */
        r->ctl->pending_send_sz = total;
        ch->pending_send = 1;
        full_barrier();
        rd = r->ctl->read_index; /* the host may have read before it saw pending_send_sz */
        if (bad_index(r, rd)) {
            vmbus_close(ch, "the host wrote a bad read_index in the guest->host ring");
            return -2;
        }
        if (r->size - to_read(r, old, rd) <= total) {
            ch->ring_full++;
            return -1;
        }
    }
    u64 desc[2] = {PKT_DATA_INBAND | (INBAND_OFFSET8 << 16) | ((u64)(plen / 8) << 32), trans_id};
    u32 w = ring_put(r, old, desc, DESC_SIZE), whole = len & ~7u;
    if (whole)
        w = ring_put(r, w, payload, whole);
    if (len & 7) {
        u64 tail = 0;
        memcpy(&tail, (const u8 *)payload + whole, len & 7);
        w = ring_put(r, w, &tail, 8);
    }
    u64 trailer = (u64)old << 32;
    w = ring_put(r, w, &trailer, TRAILER_SIZE);
    full_barrier(); /* the packet before the index that publishes it */
    r->ctl->write_index = w;
    r->index = w;
    if (ch->pending_send) {
        r->ctl->pending_send_sz = 0;
        ch->pending_send = 0;
    }
    full_barrier(); /* our index before the host's mask and read index */
    ch->tx_packets++;
    if (r->ctl->interrupt_mask == 0 && old == r->ctl->read_index)
        doorbell(ch);
    return 0;
}

int vmbus_recv(struct vmbus_channel *ch, void *buf, u32 bufsize, u32 *len, u64 *trans_id)
{
    struct vmbus_ring *r = &ch->in;
    for (;;) {
        if (!ch->open)
            return -1;
        u32 w = r->ctl->write_index, rd = r->index;
        if (bad_index(r, w)) {
            vmbus_close(ch, "the host wrote a bad write_index in the host->guest ring");
            return -1;
        }
        u32 avail = to_read(r, w, rd);
        if (!avail)
            return 0;
        full_barrier(); /* the index before the data it publishes */
        if (avail < DESC_SIZE + TRAILER_SIZE) {
            vmbus_close(ch, "the host published less than a descriptor and a trailer");
            return -1;
        }
        u64 desc[2];
        ring_get(r, rd, desc, DESC_SIZE);
        u32 type = desc[0] & 0xFFFF, off8 = (desc[0] >> 16) & 0xFFFF, len8 = (desc[0] >> 32) & 0xFFFF;
        u32 total = len8 * 8 + TRAILER_SIZE;
        if (len8 < INBAND_OFFSET8 || total > avail) {
            vmbus_close(ch, "the host wrote a packet length beyond the published bytes");
            return -1;
        }
        if (off8 < INBAND_OFFSET8 || off8 > len8) {
            vmbus_close(ch, "the host wrote a payload offset outside its packet");
            return -1;
        }
        u32 plen = (len8 - off8) * 8;
        int got = 0;
        if (type != PKT_DATA_INBAND) {
            ch->rx_skipped++; /* good framing: skip it, the ring goes on */
        } else if (plen > bufsize) {
            ch->rx_too_big++;
        } else {
            u32 start = rd + off8 * 8;
            if (start >= r->size)
                start -= r->size;
            ring_get(r, start, buf, plen);
            *len = plen;
            *trans_id = desc[1];
            got = 1;
        }
        u32 nrd = rd + total;
        if (nrd >= r->size)
            nrd -= r->size;
        full_barrier(); /* our copies out of the ring before the space is given back */
        r->ctl->read_index = nrd;
        r->index = nrd;
        full_barrier(); /* our index before the host's pending_send_sz */
        u32 pending = r->ctl->pending_send_sz;
        if (pending) { /* hv_pkt_iter_close: signal on "not enough room" -> "enough room" only */
            u32 w2 = r->ctl->write_index;
            if (!bad_index(r, w2)) {
                s64 room = (s64)(r->size - to_read(r, w2, nrd));
                if (!(room - (s64)total > (s64)pending) && room > (s64)pending) {
                    ch->wakeups++;
                    doorbell(ch);
                }
            }
        }
        if (got) {
            ch->rx_packets++;
            return 1;
        }
    }
}

int vmbus_recv_done(struct vmbus_channel *ch)
{
    if (!ch->open)
        return 0;
    ch->in.ctl->interrupt_mask = 0;
    full_barrier();
    u32 w = ch->in.ctl->write_index;
    return w != ch->in.index;
}

/* the offer's flags say whether the host has the channel open (11 port reads: only when stalled) */
static int host_has_it_open(struct vmbus_channel *ch)
{
    u32 rec[10];
    reg_w(REG_SELECT, (u32)(ch - vmbus_channels));
    for (u32 k = 0; k < 10; k++)
        rec[k] = reg_r(REG_OFFER_DATA);
    return rec[8] == ch->relid && (rec[9] & 1);
}

/* Packets the host has left unread for 100 ms: if the host still has the channel open, ring again. The signal rule (only on empty ->
 * non-empty) loses a wakeup if the consumer does not look at the write index again after
 * publishing its read index; a Hyper-V host does, this costs a compare per poll in case a host
 * does not. */
static void kick_if_stalled(struct vmbus_channel *ch)
{
    u32 rd = ch->out.ctl->read_index;
    if (rd == ch->out.index) {
        ch->stall_tick = ticks;
        return;
    }
    if (rd != ch->stall_read) {
        ch->stall_read = rd;
        ch->stall_tick = ticks;
    } else if (ticks - ch->stall_tick >= HZ / 10) {
        ch->stall_tick = ticks;
        if (!host_has_it_open(ch)) { /* the host closed it (e.g. its VSP stopped): the rings are ours */
            ch->open = 0;
            ch->close_reason = "closed by the host";
            printf("vmbus: channel %u was closed by the host\n", ch->relid);
            pmm_free(ch->ring_gpa, ch->ring_pages);
            pmm_uncommit(ch->ring_pages);
            ch->ring_gpa = 0;
            return;
        }
        ch->rekicks++;
        doorbell(ch);
    }
}

/* the kernel's poll hook: each open channel's user runs with the host's interrupts masked, then
 * once more if data came in between its last read and the unmask */
void vmbus_poll(void)
{
    for (u32 i = 0; i < vmbus_nchannels; i++) {
        struct vmbus_channel *ch = &vmbus_channels[i];
        if (ch->open)
            kick_if_stalled(ch);
        if (!ch->open && ch->callback) { /* closed: its user hears of it once */
            vmbus_callback_t cb = ch->callback;
            ch->callback = NULL;
            cb(ch);
            continue;
        }
        for (int pass = 0; pass < 4 && ch->open && ch->callback; pass++) {
            ch->in.ctl->interrupt_mask = 1;
            ch->callback(ch);
            if (!vmbus_recv_done(ch))
                break;
        }
    }
}

static void print_guid(const u8 *g)
{
    printf("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-", g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6],
           g[8], g[9]);
    for (int i = 10; i < 16; i++)
        printf("%02x", g[i]);
}

void vmbus_show(void)
{
    if (!vmbus_present) {
        puts("vmbus: no controller at port 0xe00\n");
        return;
    }
    printf("vmbus: controller at port %x, %u offers\n", VMBUS_PORT, offer_count);
    for (u32 i = 0; i < vmbus_nchannels; i++) {
        struct vmbus_channel *ch = &vmbus_channels[i];
        printf("channel %u: type ", ch->relid);
        print_guid(ch->if_type);
        printf(" %s", ch->open ? "open" : "closed");
        if (ch->close_reason)
            printf(" (%s)", ch->close_reason);
        putc('\n');
        if (!ch->ring_gpa)
            continue;
        printf("  rings at %lx: %u pages, host->guest from page %u, vector %x\n", ch->ring_gpa, ch->ring_pages,
               ch->downstream_pages, ch->vector);
        printf("  out: write %u read %u of %u, pending_send_sz %u\n", ch->out.index, ch->out.ctl->read_index,
               ch->out.size, ch->out.ctl->pending_send_sz);
        printf("  in: write %u read %u of %u, pending_send_sz %u\n", ch->in.ctl->write_index, ch->in.index,
               ch->in.size, ch->in.ctl->pending_send_sz);
        printf("  tx %lu rx %lu doorbells %lu interrupts %lu ring-full %lu wakeups %lu rekicks %lu skipped %lu "
               "too-big %lu\n",
               ch->tx_packets, ch->rx_packets, ch->doorbells, ch->interrupts, ch->ring_full, ch->wakeups,
               ch->rekicks, ch->rx_skipped, ch->rx_too_big);
    }
}
