/* storvsc.c -- the storage VSC: the guest half of pyhv's synthetic storage (docs/storage.md), modelled
 * on Hyper-V's storvsc. One disk (the page file's) on a VMBus channel of Hyper-V's synthetic SCSI class;
 * a request is READ or WRITE of N 512-byte sectors at an LBA, its buffer named by page frame numbers
 * (the host moves the data straight into or out of those pages, as with GPA direct), or
 * QUERY_PROPERTIES; the host answers each with a status under the request's id.
 *
 * Requests are synchronous: the host serves the doorbell's port write before it returns, so the
 * answer is in the ring right after the send; we read it there (a bounded wait in case a host
 * answers later). One request at a time, under `sv_lock`, from any CPU (the page fault path runs on
 * the faulting CPU). Everything here is CPL0: a handful of emulated instructions per request. */
#include "vmbus.h"

#define OP_QUERY_PROPERTIES 1
#define OP_READ 2
#define OP_WRITE 3
#define OP_UNMAP 4
#define STORAGE_VECTOR 0x50
#define WAIT_SPINS 2000000
#define MAX_DISK_SECTORS ((64UL << 30) / 512) /* pyhv's disks are at most 64 GiB */

struct storage_request {
    u16 operation, flags;
    u32 sector_count;
    u64 lba;
    u32 byte_offset, pfn_count;
    u64 pfn[STORAGE_MAX_PFNS];
} __attribute__((packed));

struct storage_response {
    u16 operation, reserved;
    u32 status;
    u64 value;
    u32 sector_size, max_transfer;
} __attribute__((packed));

_Static_assert(sizeof(struct storage_response) == 24, "storage_response");
_Static_assert(__builtin_offsetof(struct storage_request, pfn) == 24, "storage_request");

/* Hyper-V's synthetic SCSI class ba6163d9-04a1-4d29-b605-72e2ffb1dc7f, Windows byte order */
static const u8 scsi_guid[16] = {0xD9, 0x63, 0x61, 0xBA, 0xA1, 0x04, 0x29, 0x4D,
                                 0xB6, 0x05, 0x72, 0xE2, 0xFF, 0xB1, 0xDC, 0x7F};

static struct {
    struct vmbus_channel *ch;
    u64 sectors, next_id;
    u64 reads, writes, sectors_read, sectors_written, unmaps, errors, waits;
    u32 last_status;
    const char *why;
} sv;
static spinlock_t sv_lock;
static struct storage_request req;
static u8 rx[VMBUS_RECV_MAX] __attribute__((aligned(8)));

static const char *const status_names[] = {"SUCCESS",    "INVALID_REQUEST", "UNKNOWN_OPERATION", "LBA_OUT_OF_RANGE",
                                           "BAD_BUFFER", "TOO_LARGE",       "IO_ERROR"};

const char *storvsc_status_name(u32 st) { return st < 7 ? status_names[st] : "?"; }

/* send `req` (with n PFNs) and wait for its answer; returns the host's status, or -1 (no channel,
 * or no answer) */
static s64 transact(u32 n, u64 *value)
{
    struct vmbus_channel *ch = sv.ch;
    u64 id = ++sv.next_id;
    if (!ch || !ch->open)
        return -1;
    int r;
    for (u32 tries = 0; (r = vmbus_send(ch, &req, 24 + 8 * n, id)) == -1; tries++) {
        if (tries > WAIT_SPINS) /* the ring stays full: the host is gone */
            return -1;
        __asm__ volatile("pause");
    }
    if (r < 0)
        return -1;
    for (u32 spins = 0; spins < WAIT_SPINS; spins++) {
        u32 len;
        u64 tid;
        int got = vmbus_recv(ch, rx, sizeof(rx), &len, &tid);
        if (got < 0)
            return -1;
        if (got == 0) {
            if (!spins)
                sv.waits++;
            __asm__ volatile("pause");
            continue;
        }
        if (tid != id || len < sizeof(struct storage_response))
            continue; /* an answer to a request we gave up on */
        struct storage_response *resp = (void *)rx;
        *value = resp->value;
        return resp->status;
    }
    return -1;
}

int storvsc_io(int write, u64 lba, u32 sectors, const u64 *pfns, u32 n)
{
    if (!sv.ch || n > STORAGE_MAX_PFNS)
        return -1;
    u64 f = spin_lock(&sv_lock);
    req.operation = write ? OP_WRITE : OP_READ;
    req.flags = 0;
    req.sector_count = sectors;
    req.lba = lba;
    req.byte_offset = 0;
    req.pfn_count = n;
    for (u32 i = 0; i < n; i++)
        req.pfn[i] = pfns[i];
    u64 value = 0;
    s64 st = transact(n, &value);
    if (st == 0) {
        if (write) {
            sv.writes++;
            sv.sectors_written += sectors;
        } else {
            sv.reads++;
            sv.sectors_read += sectors;
        }
    } else {
        sv.errors++;
        sv.last_status = (u32)st;
    }
    spin_unlock(&sv_lock, f);
    return st == 0 ? 0 : -1;
}

/* the host may forget these sectors (whole 4 KiB blocks): it punches them out of its file */
int storvsc_unmap(u64 lba, u32 sectors)
{
    if (!sv.ch)
        return -1;
    u64 f = spin_lock(&sv_lock);
    req.operation = OP_UNMAP;
    req.flags = 0;
    req.sector_count = sectors;
    req.lba = lba;
    req.byte_offset = 0;
    req.pfn_count = 0;
    u64 value = 0;
    s64 st = transact(0, &value);
    if (st == 0) {
        sv.unmaps++;
    } else {
        sv.errors++;
        sv.last_status = (u32)st;
    }
    spin_unlock(&sv_lock, f);
    return st == 0 ? 0 : -1;
}

u64 storvsc_sectors(void) { return sv.sectors; }

void storvsc_init(void)
{
    if (!vmbus_present)
        return;
    struct vmbus_channel *ch = vmbus_find(scsi_guid);
    if (!ch)
        return;
    if (vmbus_open(ch, 16384, STORAGE_VECTOR, NULL)) {
        sv.why = "cannot open the storage channel";
        return;
    }
    sv.ch = ch;
    req.operation = OP_QUERY_PROPERTIES;
    req.flags = 0;
    req.sector_count = 0;
    req.lba = 0;
    req.byte_offset = 0;
    req.pfn_count = 0;
    u64 sectors = 0;
    s64 st = transact(0, &sectors);
    if (st != 0) {
        sv.why = "the disk did not answer QUERY_PROPERTIES";
        printf("storage: %s (status %ld)\n", sv.why, st);
        sv.ch = NULL;
        return;
    }
    if (!sectors || sectors > MAX_DISK_SECTORS) { /* the host's figure, checked like any input */
        sv.why = "the disk's size is not one this guest can use";
        printf("storage: %s (%lu sectors)\n", sv.why, sectors);
        sv.ch = NULL;
        return;
    }
    sv.sectors = sectors;
    printf("storage: disk of %lu MiB on VMBus channel %u\n", sectors / 2048, ch->relid);
}

void storvsc_show(void)
{
    if (!sv.ch) {
        printf("storage: no disk%s%s\n", sv.why ? ": " : "", sv.why ? sv.why : "");
        return;
    }
    printf("disk: %lu sectors (%lu MiB) on channel %u\n", sv.sectors, sv.sectors / 2048, sv.ch->relid);
    printf("reads: %lu (%lu sectors)\nwrites: %lu (%lu sectors)\nunmaps: %lu\nerrors: %lu (last %s)\nwaits: %lu\n",
           sv.reads, sv.sectors_read, sv.writes, sv.sectors_written, sv.unmaps, sv.errors,
           storvsc_status_name(sv.last_status), sv.waits);
}
