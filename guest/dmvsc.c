/* dmvsc.c -- the Dynamic Memory VSC: the guest half of Hyper-V's Dynamic Memory protocol
 * (reference/dynamic-memory-protocol.md), doing what Linux drivers/hv/hv_balloon.c does.
 *
 * Version WIN10 -> WIN8 -> WIN7 (5 s each), capabilities (balloon, hot-add in 2 MiB units), then a
 * status report every second from the pmm's counters, and the host's requests one at a time:
 * balloon (2 MiB runs first; ranges over several responses with more_pages; never below the floor),
 * unballoon (ranges checked by the pmm; one response after the last request), hot-add (memory above
 * RAM, up to the 64 GiB the boot page tables map) and the info message. A message from the host is
 * read into our own buffer before it is checked, so it cannot change under the checks.
 *
 * Runs from the kernel's poll hook (vmbus_poll), never in the interrupt handler. A transaction
 * message that does not fit the ring waits in `out` until the host makes room; meanwhile no new
 * request is read (the host sends the next one only after our answer anyway). */
#include "vmbus.h"

#define DM_VERSION_REQUEST 1
#define DM_VERSION_RESPONSE 2
#define DM_CAPABILITIES_REPORT 3
#define DM_CAPABILITIES_RESPONSE 4
#define DM_STATUS_REPORT 5
#define DM_BALLOON_REQUEST 6
#define DM_BALLOON_RESPONSE 7
#define DM_UNBALLOON_REQUEST 8
#define DM_UNBALLOON_RESPONSE 9
#define DM_MEM_HOT_ADD_REQUEST 10
#define DM_MEM_HOT_ADD_RESPONSE 11
#define DM_INFO_MESSAGE 12
#define DM_MEM_HOT_REMOVE_REQUEST 13 /* protocol 2.0 */
#define DM_MEM_HOT_REMOVE_RESPONSE 14
#define CAPS_HOT_REMOVE (1UL << 6)
#define CAPS_RESP_HOT_REMOVE 2
#define HR_RANGES ((DM_MAX_MESSAGE - 24) / 8) /* 509 ranges per hot-remove response */
#define HR_REGIONS 64                         /* hot-added regions remembered for hot-remove */
/* pyhv's extension (types from 0x8000; docs/dynamic-memory.md): free-page hints, sent only to a
 * host that set bit 3 of the capabilities response */
#define DM_FREE_PAGE_HINT 0x8000
#define DM_FREE_PAGE_HINT_RESPONSE 0x8001
#define CAPS_RESP_FREE_PAGE_HINTS 8
#define HINT_TICKS 1 /* a hint pass at most once a tick, and only after something was freed */

#define DM_WIN7 0x00000003u
#define DM_WIN8 0x00010000u
#define DM_WIN10 0x00020000u

#define DM_MAX_MESSAGE 4096
#define DM_MAX_RANGES ((DM_MAX_MESSAGE - 16) / 8) /* 510 */
#define MAX_RANGE_PAGES ((1UL << 24) - 1)
#define PFN_MASK ((1UL << 40) - 1)
#define HOT_ADD_ALIGNMENT 1 /* 2^1 MiB: the pmm adds memory in 2 MiB blocks */
#define ANSWER_TICKS (5 * HZ) /* Linux waits 5 s for each version and capabilities answer */
#define MESSAGES_PER_PASS 16  /* keep each poll pass short: the shell shares the CPU */
#define DM_VECTOR_BASE 0x40
#define BURST_PAGES (16 * 256) /* committed up this much since the last report: report at once ... */
#define BURST_TICKS 1          /* ... but at most once a tick (10 ms) */

struct dm_header {
    u16 type, size;
    u32 trans_id;
} __attribute__((packed));

struct dm_version_request {
    struct dm_header hdr;
    u32 version, is_last_attempt;
} __attribute__((packed));

struct dm_capabilities {
    struct dm_header hdr;
    u64 caps, min_page_cnt, max_page_number;
} __attribute__((packed));

struct dm_status {
    struct dm_header hdr;
    u64 num_avail, num_committed, page_file_size, zero_free;
    u32 page_file_writes, io_diff;
} __attribute__((packed));

struct dm_balloon_response {
    struct dm_header hdr;
    u32 reservedz, more_and_count; /* bit0 more_pages, bits 1-31 range_count */
    u64 range[DM_MAX_RANGES];
} __attribute__((packed));

/* what a hint says: whole free 2 MiB blocks, as runs; out of the allocator until the response */
struct dm_free_page_hint {
    struct dm_header hdr;
    u32 reservedz, range_count;
    u64 range[DM_MAX_RANGES];
} __attribute__((packed));

struct dm_free_page_hint_response {
    struct dm_header hdr;
    u32 discarded_pages, refused_ranges;
} __attribute__((packed));

struct dm_unballoon_request {
    struct dm_header hdr;
    u32 more_pages, range_count;
    u64 range[];
} __attribute__((packed));

struct dm_hot_add {
    struct dm_header hdr;
    u64 range, region; /* region only when hdr.size is 24 */
} __attribute__((packed));

struct dm_hot_add_response {
    struct dm_header hdr;
    u32 page_count, result;
} __attribute__((packed));

struct dm_hot_remove {
    struct dm_header hdr;
    u32 virtual_node, page_count, qos_flags, reservedz;
} __attribute__((packed));

struct dm_hot_remove_response {
    struct dm_header hdr;
    u32 result, range_count;
    u64 more_pages; /* bit 0 */
    u64 range[HR_RANGES];
} __attribute__((packed));

struct dm_info_msg {
    struct dm_header hdr;
    u32 reserved, info_size;
    u8 info[];
} __attribute__((packed));

_Static_assert(sizeof(struct dm_version_request) == 16, "dm_version_request");
_Static_assert(sizeof(struct dm_capabilities) == 32, "dm_capabilities");
_Static_assert(sizeof(struct dm_status) == 48, "dm_status");
_Static_assert(sizeof(struct dm_balloon_response) == DM_MAX_MESSAGE, "dm_balloon_response");
_Static_assert(sizeof(struct dm_unballoon_request) == 16, "dm_unballoon_request");
_Static_assert(sizeof(struct dm_hot_add_response) == 16, "dm_hot_add_response");
_Static_assert(sizeof(struct dm_info_msg) == 16, "dm_info_msg");
_Static_assert(sizeof(struct dm_hot_remove) == 24, "dm_hot_remove");
_Static_assert(sizeof(struct dm_hot_remove_response) <= DM_MAX_MESSAGE, "dm_hot_remove_response");
_Static_assert(sizeof(struct dm_free_page_hint) == DM_MAX_MESSAGE, "dm_free_page_hint");
_Static_assert(sizeof(struct dm_free_page_hint_response) == 16, "dm_free_page_hint_response");

enum { DM_OFF, DM_NO_CHANNEL, DM_VERSION, DM_CAPS, DM_READY, DM_FAILED };
static const char *const state_names[] = {"off", "no-channel", "version", "capabilities", "ready", "failed"};

static struct {
    struct vmbus_channel *ch;
    int state;
    u32 version;  /* being proposed, then the one accepted */
    u32 trans_id; /* the guest makes the transaction ids: one counter for every message */
    u64 deadline; /* tick by which the host must answer version or capabilities */
    const char *why;
    u32 out_len; /* a message waiting in `out` for room in the ring */
    /* a balloon request being answered */
    int ballooning;
    u64 balloon_left, balloon_floor;
    /* what was sent last */
    u64 last_status_tick, last_avail, last_committed;
    int status_due; /* send a report at the next poll, whatever the clock says */
    /* counters */
    u64 msgs_in, msgs_out, bad_msgs, status_sent, status_skipped, status_bursts;
    u64 balloon_requests, balloon_asked, balloon_pages, balloon_refused, balloon_responses;
    u64 ballooned; /* pages the host holds through us now */
    u64 unballoon_requests, unballoon_pages, unballoon_bad;
    u64 hot_add_requests, hot_add_pages, hot_add_failed;
    u64 info_msgs, max_page_count;
    u64 deaf, unballoon_ignored, reopens, balloon_returned; /* the host's tests: see dmvsc_command */
    /* free-page hints */
    int hints_ok, hint_inflight;
    u32 hint_n;
    u64 hint_gen, hint_tick, hint_sent_tick;
    u64 hints_sent, hinted_pages, hint_refused_ranges, hint_last_pages, hint_last_ticks;
    /* hot-remove (protocol 2.0): the hot-added regions, and a request being answered */
    int hr_ok, hr_active, hr_hostile, hr_large; /* hr_large: DM_REMOVE_QOS_LARGE, whole 2 MiB blocks only */
    u32 hr_nregions;
    u64 hr_left, hr_floor, hr_region_pass, hr_block_pass, hot_add_limit;
    u64 hr_requests, hr_asked, hr_pages, hr_regions_removed, hr_responses, hr_strays;
} dm;
static struct pmm_range hr_regions[HR_REGIONS];

/* message buffers: not zeroed at boot, every byte sent is written first */
static u8 out[DM_MAX_MESSAGE] __attribute__((section(".bss.noinit"), aligned(8)));
static u8 rx[DM_MAX_MESSAGE] __attribute__((section(".bss.noinit"), aligned(8)));
static struct pmm_range taken[DM_MAX_RANGES] __attribute__((section(".bss.noinit")));
static struct pmm_range hinting[DM_MAX_RANGES] __attribute__((section(".bss.noinit")));

static void hint_abort(void);

static const u8 dm_guid[16] = {0xDC, 0x74, 0x50, 0x52, 0x85, 0x89, 0xE2, 0x46,
                               0x80, 0x57, 0xA3, 0x07, 0xDC, 0x18, 0xA5, 0x02};

static void fail(const char *why)
{
    hint_abort();
    dm.state = DM_FAILED;
    dm.why = why;
    printf("dm: %s\n", why);
}

static void header(struct dm_header *h, u16 type, u16 size)
{
    h->type = type;
    h->size = size;
    h->trans_id = ++dm.trans_id;
}

/* send what is in `out`; it stays there while the ring is full */
static int flush(void)
{
    if (!dm.out_len)
        return 0;
    int r = vmbus_send(dm.ch, out, dm.out_len, 0);
    if (r == -1)
        return -1;
    if (r < 0) {
        dm.out_len = 0;
        fail(!dm.ch->open && dm.ch->close_reason ? dm.ch->close_reason : "cannot send a message larger than the ring");
        return -1;
    }
    dm.out_len = 0;
    dm.msgs_out++;
    return 0;
}

static void post(u32 len)
{
    dm.out_len = len;
    flush();
}

static void send_version(u32 version)
{
    struct dm_version_request *m = (void *)out;
    header(&m->hdr, DM_VERSION_REQUEST, sizeof(*m));
    m->version = version;
    m->is_last_attempt = version == DM_WIN7; /* Linux gives up after WIN7 */
    dm.version = version;
    dm.state = DM_VERSION;
    dm.deadline = ticks + ANSWER_TICKS;
    post(sizeof(*m));
}

static void send_caps(void)
{
    struct pmm_stats s;
    pmm_stats(&s);
    struct dm_capabilities *m = (void *)out;
    header(&m->hdr, DM_CAPABILITIES_REPORT, sizeof(*m));
    m->caps = 1 | 2 | (HOT_ADD_ALIGNMENT << 2) | CAPS_HOT_REMOVE; /* balloon, hot-add (2^n MiB), hot-remove */
    m->min_page_cnt = s.committed + pmm_balloon_floor(); /* what the guest needs: the kernel and the floor */
    m->max_page_number = MAX_PHYS / PAGE_SIZE;           /* the boot page tables map 0..64 GiB */
    dm.state = DM_CAPS;
    dm.deadline = ticks + ANSWER_TICKS;
    post(sizeof(*m));
}

/* num_committed as Linux's hv_balloon: committed + ballooned + (added - onlined) + floor; the pmm
 * onlines hot-added memory at once, so the third term is 0; the floor is of at most the boot RAM
 * (pmm.c), so a hot-add does not raise the demand it answered */
static void send_status(void)
{
    if (dm.out_len) { /* a transaction message waits for room: it goes first */
        dm.status_skipped++;
        return;
    }
    struct pmm_stats s;
    pmm_stats(&s);
    struct dm_status m;
    header(&m.hdr, DM_STATUS_REPORT, sizeof(m));
    m.num_avail = s.free;
    m.num_committed = s.committed + s.ballooned + pmm_balloon_floor();
    struct paging_stats ps;
    paging_get_stats(&ps);
    m.page_file_size = ps.file_pages; /* pages, as Hyper-V's guests report their page files */
    m.page_file_writes = (u32)ps.page_outs;
    m.zero_free = 0;
    m.io_diff = 0;
    dm.last_status_tick = ticks;
    dm.status_due = 0;
    if (vmbus_send(dm.ch, &m, sizeof(m), 0)) {
        dm.status_skipped++; /* ring full: the next second's report says it all again */
        return;
    }
    dm.msgs_out++;
    dm.status_sent++;
    dm.last_avail = m.num_avail;
    dm.last_committed = m.num_committed;
}

/* Pressure that rises sharply is reported at once, not at the next second (Linux's hv_balloon
 * reports once a second only: a burst of allocation waits that long for the host to hear of it). */
static int pressure_rose(void)
{
    if (ticks - dm.last_status_tick < BURST_TICKS)
        return 0;
    struct pmm_stats s;
    pmm_stats(&s);
    if (s.committed + s.ballooned + pmm_balloon_floor() < dm.last_committed + BURST_PAGES)
        return 0;
    dm.status_bursts++;
    return 1;
}

/* ---------------------------------------------------------------- free-page hints */
/* Tell the host of whole 2 MiB blocks freed since the last pass (as Linux's free page reporting
 * does with HvExtCallMemoryHeatHint): it discards the memory behind them and the guest keeps
 * them; a later write gets a fresh zero page. The blocks stay out of the allocator until the
 * host's response, so nothing is written to them while the host discards them. */
static void hint_pass(void)
{
    u64 gen = pmm_free_gen();
    dm.hint_tick = ticks;
    u32 n = 0;
    u64 pages = pmm_hint_take(hinting, DM_MAX_RANGES, &n);
    if (n < DM_MAX_RANGES)
        dm.hint_gen = gen; /* all found: the next pass waits for another free */
    if (!pages)
        return;
    struct dm_free_page_hint *m = (void *)out;
    for (u32 i = 0; i < n; i++)
        m->range[i] = (hinting[i].base / PAGE_SIZE) | (hinting[i].pages << 40);
    header(&m->hdr, DM_FREE_PAGE_HINT, (u16)(16 + 8 * n));
    m->reservedz = 0;
    m->range_count = n;
    dm.hint_n = n;
    dm.hint_inflight = 1;
    dm.hint_sent_tick = ticks;
    dm.hint_last_pages = pages;
    dm.hints_sent++;
    post(16 + 8 * n);
}

/* Misbehave on purpose, for the host's tests: a hint naming memory outside RAM, a range that is
 * not whole 2 MiB blocks, and the first ballooned block (if any). None is taken from the pmm. */
static void hint_hostile(void)
{
    struct pmm_stats s;
    pmm_stats(&s);
    if (dm.state != DM_READY || !dm.hints_ok || dm.hint_inflight || dm.out_len) {
        puts("dm: no hint can be sent now (not ready, hints off, or one in flight)\n");
        return;
    }
    struct dm_free_page_hint *m = (void *)out;
    u32 n = 0;
    m->range[n++] = ((MAX_PHYS / PAGE_SIZE) - 512) | (512UL << 40);    /* beyond the guest's RAM */
    m->range[n++] = ((s.visible / 2) | 1) | (512UL << 40);             /* not 2 MiB-aligned */
    u64 ballooned;
    if (dm.ballooned && pmm_first_ballooned_block(&ballooned) == 0) /* the host holds it already */
        m->range[n++] = ballooned;
    header(&m->hdr, DM_FREE_PAGE_HINT, (u16)(16 + 8 * n));
    m->reservedz = 0;
    m->range_count = n;
    dm.hint_n = 0; /* nothing to give back on the response */
    dm.hint_inflight = 1;
    dm.hint_sent_tick = ticks;
    post(16 + 8 * n);
    printf("dm: sent a hint with %u ranges the host must refuse\n", n);
}

static void hint_response(const struct dm_free_page_hint_response *m)
{
    pmm_hint_done(hinting, dm.hint_n);
    dm.hint_inflight = 0;
    dm.hinted_pages += m->discarded_pages;
    dm.hint_refused_ranges += m->refused_ranges;
    dm.hint_last_ticks = ticks - dm.hint_sent_tick;
}

/* the channel went away with a hint in flight: the blocks are the allocator's again */
static void hint_abort(void)
{
    if (dm.hint_inflight)
        pmm_hint_done(hinting, dm.hint_n);
    dm.hint_inflight = 0;
}

/* ---------------------------------------------------------------- balloon */
/* One DM_BALLOON_RESPONSE per call: up to 510 ranges taken from the pmm, 2 MiB runs first (a run
 * of whole blocks is one range). more_pages until the request is met or the floor is reached. */
static void balloon_step(void)
{
    struct dm_balloon_response *m = (void *)out;
    u64 want = dm.balloon_left < MAX_RANGE_PAGES ? dm.balloon_left : MAX_RANGE_PAGES, got = 0;
    u32 n = 0;
    if (want)
        got = pmm_balloon_take(want, dm.balloon_floor, taken, DM_MAX_RANGES, &n);
    for (u32 i = 0; i < n; i++)
        m->range[i] = (taken[i].base / PAGE_SIZE) | (taken[i].pages << 40);
    dm.balloon_left -= got;
    dm.balloon_pages += got;
    dm.ballooned += got;
    /* done when met, or when the pmm gave less than asked without running out of ranges (floor) */
    int done = !dm.balloon_left || !got || (got < want && n < DM_MAX_RANGES);
    if (done) {
        dm.balloon_refused += dm.balloon_left;
        dm.ballooning = 0;
    }
    header(&m->hdr, DM_BALLOON_RESPONSE, (u16)(16 + 8 * n));
    m->reservedz = 0;
    m->more_and_count = (done ? 0 : 1) | (n << 1);
    dm.balloon_responses++;
    post(16 + 8 * n);
}

static void balloon_request(u32 num_pages)
{
    struct pmm_stats s;
    pmm_stats(&s);
    dm.balloon_requests++;
    dm.balloon_asked += num_pages;
    /* never more than the guest has; the floor is computed once per request, as Linux does */
    dm.balloon_left = num_pages < s.visible ? num_pages : s.visible;
    dm.balloon_refused += num_pages - dm.balloon_left;
    dm.balloon_floor = pmm_balloon_floor();
    dm.ballooning = 1;
}

/* ---------------------------------------------------------------- other requests */
static void unballoon_request(const struct dm_unballoon_request *m, u32 size)
{
    u32 count = m->range_count;
    if (count > DM_MAX_RANGES || size != 16 + 8 * count) {
        dm.bad_msgs++;
        printf("dm: unballoon request of %u bytes with %u ranges: ignored\n", size, count);
        return;
    }
    dm.unballoon_requests++;
    for (u32 i = 0; i < count; i++) {
        u64 start = m->range[i] & PFN_MASK, cnt = m->range[i] >> 40;
        if (!cnt || cnt > dm.ballooned || start >= MAX_PHYS / PAGE_SIZE || cnt > MAX_PHYS / PAGE_SIZE - start ||
            pmm_balloon_give(start * PAGE_SIZE, cnt)) {
            dm.unballoon_bad++; /* not pages we ballooned: keep nothing of it */
            continue;
        }
        dm.ballooned -= cnt;
        dm.unballoon_pages += cnt;
    }
    if (m->more_pages & 1)
        return; /* one response, after the last request */
    header((struct dm_header *)out, DM_UNBALLOON_RESPONSE, sizeof(struct dm_header));
    post(sizeof(struct dm_header));
}

/* ---------------------------------------------------------------- hot-remove */
/* What the host may take back: the regions it hot-added, newest last. */
static void hot_remove_remember(u64 base, u64 pages)
{
    if (dm.hr_nregions == HR_REGIONS) {
        puts("dm: too many hot-added regions to remember: this one cannot be hot-removed\n");
        return;
    }
    hr_regions[dm.hr_nregions].base = base;
    hr_regions[dm.hr_nregions].pages = pages;
    dm.hr_nregions++;
}

static void hot_remove_request(const struct dm_hot_remove *m)
{
    dm.hr_requests++;
    dm.hr_asked += m->page_count;
    dm.hr_left = m->page_count;
    dm.hr_floor = pmm_balloon_floor(); /* never below what the guest keeps to run, as the balloon */
    dm.hr_region_pass = 1;
    dm.hr_large = m->qos_flags & 1; /* DM_REMOVE_QOS_LARGE */
    dm.hr_active = 1;
}

/* The ranges a hostile guest adds (`dm badremove`): memory beyond RAM, a range named twice, a
 * ballooned block, more pages than asked, and the 2 MiB block holding our channel's ring. */
static u32 hot_remove_lies(struct dm_hot_remove_response *m, u32 n)
{
    u32 k = n;
    u64 *range = (u64 *)((u8 *)m + 24); /* 8-byte aligned: `out` is */
    range[k++] = ((MAX_PHYS / PAGE_SIZE) - 512) | (512UL << 40);
    if (n)
        range[k++] = range[0];
    u64 ballooned;
    if (dm.ballooned && pmm_first_ballooned_block(&ballooned) == 0)
        range[k++] = ballooned;
    range[k++] = (4096UL) | ((dm.hr_asked + 512) << 40); /* boot RAM, more than ever asked */
    range[k++] = ((dm.ch->ring_gpa / PAGE_SIZE) & ~511UL) | (512UL << 40); /* the host's ring */
    dm.hr_hostile = 0;
    printf("dm: hot-remove response with %u ranges the host must refuse\n", k - n);
    return k;
}

/* One DM_MEM_HOT_REMOVE_RESPONSE per call: whole free hot-added regions first (newest first), then
 * free 2 MiB blocks of the others; more_pages while a full message leaves pages to find. */
static void hot_remove_step(void)
{
    struct dm_hot_remove_response *m = (void *)out;
    u32 n = 0;
    u64 got = 0;
    for (u32 i = dm.hr_nregions; dm.hr_region_pass && i-- > 0 && n < HR_RANGES;) {
        struct pmm_range *r = &hr_regions[i];
        /* a region that ends in part of a block (a hot-add taken in part) goes whole only when the
         * host takes any run: with QOS_LARGE its whole blocks go in the block pass below */
        if (!r->pages || r->pages > dm.hr_left - got || (dm.hr_large && r->pages % BLOCK_PAGES) ||
            pmm_hot_remove_region(r->base, r->pages, dm.hr_floor))
            continue;
        m->range[n++] = (r->base / PAGE_SIZE) | (r->pages << 40);
        got += r->pages;
        dm.hr_regions_removed++;
        r->pages = 0; /* offline: forgotten until the host adds it again */
    }
    if (n < HR_RANGES)
        dm.hr_region_pass = 0;
    for (u32 i = dm.hr_nregions; !dm.hr_region_pass && i-- > 0 && n < HR_RANGES && got < dm.hr_left;) {
        u32 k = 0;
        got += pmm_hot_remove_blocks(hr_regions[i].base, hr_regions[i].pages, dm.hr_left - got, dm.hr_floor, taken,
                                     HR_RANGES - n, &k);
        for (u32 j = 0; j < k; j++)
            m->range[n++] = (taken[j].base / PAGE_SIZE) | (taken[j].pages << 40);
    }
    dm.hr_left -= got;
    dm.hr_pages += got;
    int done = !dm.hr_left || n < HR_RANGES;
    if (done)
        dm.hr_active = 0;
    if (done && dm.hr_hostile && n + 5 <= HR_RANGES)
        n = hot_remove_lies(m, n);
    header(&m->hdr, DM_MEM_HOT_REMOVE_RESPONSE, (u16)(24 + 8 * n));
    m->result = 1;
    m->range_count = n;
    m->more_pages = done ? 0 : 1;
    dm.hr_responses++;
    dm.status_due = 1;
    post(24 + 8 * n);
}

/* `dm strayremove`: a hot-remove response the host never asked for (a range of boot RAM) */
static void hot_remove_stray(void)
{
    if (dm.state != DM_READY || dm.out_len || dm.hr_active) {
        puts("dm: no stray response can be sent now\n");
        return;
    }
    struct dm_hot_remove_response *m = (void *)out;
    m->range[0] = (8192UL) | (512UL << 40);
    header(&m->hdr, DM_MEM_HOT_REMOVE_RESPONSE, 32);
    m->result = 1;
    m->range_count = 1;
    m->more_pages = 0;
    dm.hr_strays++;
    post(32);
    puts("dm: sent a hot-remove response with no request outstanding\n");
}

static void hot_add_request(const struct dm_hot_add *m, u32 size)
{
    u64 start = m->range & PFN_MASK, cnt = m->range >> 40, added = 0;
    u32 result;
    dm.hot_add_requests++;
    const u64 limit = MAX_PHYS / PAGE_SIZE;
    if (size == 24) {
        u64 rstart = m->region & PFN_MASK, rcnt = m->region >> 40;
        if (start < rstart || start + cnt > rstart + rcnt) {
            printf("dm: hot-add range %lx+%lu outside its region %lx+%lu\n", start, cnt, rstart, rcnt);
            cnt = 0;
        }
    }
    if (!cnt) {
        result = 0; /* nothing to add: a failure, the host may try again */
    } else if (start >= limit) {
        result = 1; /* success with 0 pages: permanent, this guest maps nothing above 64 GiB */
    } else {
        u64 n = cnt < limit - start ? cnt : limit - start; /* fewer than asked: the upper barrier */
        if (dm.hot_add_limit && n > dm.hot_add_limit)
            n = dm.hot_add_limit; /* `dm hotaddlimit`: a guest that takes part of what is offered */
        if (!pmm_hot_add(start * PAGE_SIZE, n)) {
            added = n;
            result = 1;
            hot_remove_remember(start * PAGE_SIZE, n);
        } else {
            result = 0; /* overlap or no descriptors: transient as far as the host knows */
        }
    }
    dm.hot_add_pages += added;
    if (added < cnt || !cnt)
        dm.hot_add_failed++;
    struct dm_hot_add_response *r = (void *)out;
    header(&r->hdr, DM_MEM_HOT_ADD_RESPONSE, sizeof(*r));
    r->page_count = (u32)added;
    r->result = result;
    post(sizeof(*r));
    dm.status_due = 1; /* as Linux: a status report right after the hot-add */
}

static void info_message(const struct dm_info_msg *m, u32 size)
{
    u32 n = m->info_size;
    if (dm.version < DM_WIN8 || n > DM_MAX_MESSAGE || size != 16 + n) {
        dm.bad_msgs++;
        printf("dm: info message of %u bytes, info_size %u, protocol %x: ignored\n", size, n, dm.version);
        return;
    }
    dm.info_msgs++;
    for (u32 off = 0; off + 8 <= n;) {
        u32 type, dsize;
        memcpy(&type, m->info + off, 4);
        memcpy(&dsize, m->info + off + 4, 4);
        if (dsize > n - off - 8)
            break;
        if (type == 0 && dsize == 8) /* INFO_TYPE_MAX_PAGE_CNT */
            memcpy(&dm.max_page_count, m->info + off + 8, 8);
        off += 8 + dsize;
    }
}

static void message(u32 len)
{
    const struct dm_header *h = (const void *)rx;
    dm.msgs_in++;
    if (len < sizeof(*h) || h->size < sizeof(*h) || h->size > len) {
        dm.bad_msgs++;
        printf("dm: a message of %u bytes says it has %u: ignored\n", len, len >= 8 ? h->size : 0);
        return;
    }
    u32 size = h->size;
    const u64 *body = (const u64 *)(rx + 8);
    switch (h->type) {
    case DM_VERSION_RESPONSE:
        if (dm.state != DM_VERSION || size != 16)
            break;
        if (*body & 1) {
            send_caps();
        } else if (dm.version == DM_WIN10) {
            send_version(DM_WIN8);
        } else if (dm.version == DM_WIN8) {
            send_version(DM_WIN7);
        } else {
            fail("the host accepted none of the protocol versions 2.0, 1.0, 0.3");
        }
        return;
    case DM_CAPABILITIES_RESPONSE:
        if (dm.state != DM_CAPS || size != 16)
            break;
        if (!(*body & 1)) {
            fail("the host refused our capabilities: Dynamic Memory is off");
            return;
        }
        dm.state = DM_READY;
        dm.status_due = 1; /* quietly: a line now would land in the middle of a shell command */
        dm.hints_ok = !!(*body & CAPS_RESP_FREE_PAGE_HINTS);
        dm.hr_ok = dm.version >= DM_WIN10 && (*body & CAPS_RESP_HOT_REMOVE);
        dm.hint_gen = pmm_free_gen() - 1; /* a first pass tells the host of all free memory */
        return;
    case DM_BALLOON_REQUEST:
        if (dm.state != DM_READY || size != 16)
            break;
        balloon_request((u32)*body);
        return;
    case DM_UNBALLOON_REQUEST:
        if (dm.state != DM_READY || size < 16)
            break;
        if (dm.deaf) { /* misbehaving on purpose: no pages freed, no answer */
            dm.unballoon_ignored++;
            if (size >= 16 && !(((const struct dm_unballoon_request *)rx)->more_pages & 1))
                dm.deaf--;
            return;
        }
        unballoon_request((const void *)rx, size);
        return;
    case DM_MEM_HOT_ADD_REQUEST:
        if (dm.state != DM_READY || (size != 16 && size != 24))
            break;
        hot_add_request((const void *)rx, size);
        return;
    case DM_MEM_HOT_REMOVE_REQUEST: /* for no pages, or with reserved bits set: malformed */
        if (dm.state != DM_READY || size != 24 || !dm.hr_ok || dm.hr_active ||
            !((const struct dm_hot_remove *)rx)->page_count || ((const struct dm_hot_remove *)rx)->reservedz ||
            (((const struct dm_hot_remove *)rx)->qos_flags & ~3u))
            break;
        hot_remove_request((const void *)rx);
        return;
    case DM_FREE_PAGE_HINT_RESPONSE:
        if (dm.state != DM_READY || size != 16 || !dm.hint_inflight)
            break;
        hint_response((const void *)rx);
        return;
    case DM_INFO_MESSAGE:
        if (dm.state != DM_READY || size < 16)
            break;
        info_message((const void *)rx, size);
        return;
    }
    dm.bad_msgs++;
    printf("dm: message type %u of %u bytes in state %s: ignored\n", h->type, size, state_names[dm.state]);
}

static void dm_callback(struct vmbus_channel *ch)
{
    if (dm.state == DM_FAILED || dm.state == DM_OFF)
        return;
    if (!ch->open) {
        fail(ch->close_reason ? ch->close_reason : "the channel closed");
        return;
    }
    for (u32 i = 0; i < MESSAGES_PER_PASS; i++) {
        if (flush())
            break; /* the ring is full: the host interrupts when it has made room */
        if (dm.ballooning && !dm.hint_inflight) { /* blocks out for a hint come back first */
            balloon_step();
            continue;
        }
        if (dm.hr_active && !dm.hint_inflight) {
            hot_remove_step();
            continue;
        }
        u32 len;
        u64 tid;
        int r = vmbus_recv(ch, rx, sizeof(rx), &len, &tid);
        if (r < 0) {
            fail(ch->close_reason ? ch->close_reason : "the channel closed");
            return;
        }
        if (!r)
            break;
        message(len);
        if (dm.state == DM_FAILED)
            return;
    }
    if ((dm.state == DM_VERSION || dm.state == DM_CAPS) && (s64)(ticks - dm.deadline) >= 0) {
        fail(dm.state == DM_VERSION ? "no answer to the version request in 5 s" : "no answer to the capabilities in 5 s");
        return;
    }
    if (dm.state == DM_READY && (dm.status_due || ticks - dm.last_status_tick >= HZ || pressure_rose()))
        send_status();
    if (dm.state == DM_READY && dm.hints_ok && !dm.hint_inflight && !dm.out_len && !dm.ballooning &&
        pmm_free_gen() != dm.hint_gen && ticks - dm.hint_tick >= HINT_TICKS)
        hint_pass();
}

void dmvsc_init(void)
{
    if (!(boot.flags & 1) && !vmbus_present)
        return; /* not wanted, and nothing offers it */
    if (!vmbus_present) {
        puts("dm: Dynamic Memory wanted but there is no VMBus controller\n");
        dm.state = DM_NO_CHANNEL;
        return;
    }
    struct vmbus_channel *ch = vmbus_find(dm_guid);
    if (!ch) {
        dm.state = DM_NO_CHANNEL;
        if (boot.flags & 1)
            puts("dm: Dynamic Memory wanted but the host offers no Dynamic Memory channel\n");
        return;
    }
    u32 bytes = ch->ring_data_bytes;
    if (bytes < 2 * DM_MAX_MESSAGE || bytes > 65536 || bytes % PAGE_SIZE)
        bytes = 16384; /* VMBUS_RING_SIZE(16 KiB) as Linux; the offer may say otherwise, if a 4 KiB message fits */
    if (vmbus_open(ch, bytes, DM_VECTOR_BASE + (u32)(ch - vmbus_channels), dm_callback)) {
        fail("cannot open the Dynamic Memory channel");
        return;
    }
    dm.ch = ch;
    send_version(DM_WIN10);
}

/* Start over as a guest whose DM driver restarts: close the channel, take back every page the
 * host held through us (its balloon goes with the channel, as after a reboot) and negotiate again
 * on a new ring. */
static void reopen(void)
{
    struct vmbus_channel *ch = dm.ch;
    if (!ch) {
        puts("dm: there is no Dynamic Memory channel to reopen\n");
        return;
    }
    vmbus_close(ch, "the guest reopens Dynamic Memory");
    hint_abort();
    u64 back = pmm_balloon_return(dm.ballooned);
    dm.ballooned -= back;
    dm.balloon_returned += back;
    dm.reopens++;
    dm.out_len = 0;
    dm.ballooning = 0;
    dm.hr_active = 0;
    dm.status_due = 0;
    dm.why = NULL;
    if (vmbus_open(ch, ch->in.size, DM_VECTOR_BASE + (u32)(ch - vmbus_channels), dm_callback)) {
        fail("cannot reopen the Dynamic Memory channel");
        return;
    }
    printf("dm: reopened; %lu ballooned pages are the guest's again\n", back);
    send_version(DM_WIN10);
}

void dmvsc_command(int argc, char **argv)
{
    u64 n;
    if (argc == 1) {
        dmvsc_show();
    } else if (argc == 2 && !strcmp(argv[1], "reopen")) {
        reopen();
    } else if (argc == 2 && !strcmp(argv[1], "badhint")) {
        hint_hostile();
    } else if (argc == 2 && !strcmp(argv[1], "badremove")) {
        dm.hr_hostile = 1;
        puts("dm: the next hot-remove response names memory the host must refuse\n");
    } else if (argc == 2 && !strcmp(argv[1], "nohints")) {
        dm.hints_ok = 0; /* freed memory stays with the host: what a hot-remove frees shows */
        puts("dm: no more free-page hints\n");
    } else if (argc == 2 && !strcmp(argv[1], "strayremove")) {
        hot_remove_stray();
    } else if (argc == 3 && !strcmp(argv[1], "hotaddlimit") && !parse_u64(argv[2], &n) && n <= 65536) {
        dm.hot_add_limit = n * 256;
        printf("dm: hot-adds take at most %lu MiB each\n", n);
    } else if (argc == 3 && !strcmp(argv[1], "deaf") && !parse_u64(argv[2], &n) && n <= 1000) {
        dm.deaf = n;
        printf("dm: ignoring the next %lu unballoon requests\n", n);
    } else {
        puts("dm: usage dm [reopen | deaf N | badhint | badremove | strayremove | hotaddlimit MB | nohints]\n");
    }
}

void dmvsc_show(void)
{
    printf("state: %s\n", state_names[dm.state]);
    if (dm.why)
        printf("why: %s\n", dm.why);
    if (dm.state == DM_OFF || dm.state == DM_NO_CHANNEL)
        return;
    printf("protocol: %u.%u (%x)\n", dm.version >> 16, dm.version & 0xFF, dm.version);
    printf("channel: %u\n", dm.ch ? dm.ch->relid : 0);
    printf("status-reports: %lu\nstatus-skipped: %lu\nstatus-bursts: %lu\n", dm.status_sent, dm.status_skipped,
           dm.status_bursts);
    printf("last-available: %lu\nlast-committed: %lu\n", dm.last_avail, dm.last_committed);
    printf("ballooned: %lu\n", dm.ballooned);
    printf("balloon-requests: %lu\nballoon-asked: %lu\nballoon-pages: %lu\nballoon-refused: %lu\n",
           dm.balloon_requests, dm.balloon_asked, dm.balloon_pages, dm.balloon_refused);
    printf("balloon-responses: %lu\n", dm.balloon_responses);
    printf("unballoon-requests: %lu\nunballoon-pages: %lu\nunballoon-bad-ranges: %lu\n", dm.unballoon_requests,
           dm.unballoon_pages, dm.unballoon_bad);
    printf("hot-add-requests: %lu\nhot-add-pages: %lu\nhot-add-failed: %lu\n", dm.hot_add_requests,
           dm.hot_add_pages, dm.hot_add_failed);
    printf("info-messages: %lu\nmax-page-count: %lu\n", dm.info_msgs, dm.max_page_count);
    printf("unballoon-ignored: %lu\nreopens: %lu\nballoon-returned: %lu\n", dm.unballoon_ignored, dm.reopens,
           dm.balloon_returned);
    printf("free-page-hints: %s\nhints-sent: %lu\nhinted-pages: %lu\nhint-refused-ranges: %lu\n",
           dm.hints_ok ? "on" : "off", dm.hints_sent, dm.hinted_pages, dm.hint_refused_ranges);
    printf("hint-last-pages: %lu\nhint-last-ms: %lu\n", dm.hint_last_pages, dm.hint_last_ticks * (1000 / HZ));
    printf("hot-remove: %s\nhot-remove-requests: %lu\nhot-remove-asked: %lu\nhot-removed-pages: %lu\n",
           dm.hr_ok ? "on" : "off", dm.hr_requests, dm.hr_asked, dm.hr_pages);
    printf("hot-removed-regions: %lu\nhot-remove-responses: %lu\n", dm.hr_regions_removed, dm.hr_responses);
    printf("messages-in: %lu\nmessages-out: %lu\nbad-messages: %lu\n", dm.msgs_in, dm.msgs_out, dm.bad_msgs);
}
