/* shell.c -- the console shell: line editing, and the commands tests and people type. */
#include "kernel.h"

#define LINE_MAX 128
#define MAX_ARGS 8
#define DEBUG_RANGES 512

static char line[LINE_MAX];
static u32 len;
static int last_cr;
static struct pmm_range balloon_ranges[DEBUG_RANGES] __attribute__((section(".bss.noinit"))); /* `balloon` holds */
static u32 balloon_nranges;

static void prompt(void) { puts("pyhv> "); }

static void cmd_help(void)
{
    puts("commands:\n"
         "  mem                     memory counters in MiB (visible, free, committed, ballooned, hot-added)\n"
         "  testlimit -m MB [-c N] [-p]  commit and touch N chunks of MB MiB, hold them until kill/free\n"
         "  dirty MB [PAGES/S] [-p|-c CPU]  keep rewriting MB MiB (one word per page) in the background\n"
         "                          -p: one such task per online CPU, each pinned to its CPU; -c: on CPU only\n"
         "  read MB [-c CPU]        keep reading MB MiB (one word per page), counting (see tasks)\n"
         "  tasks                   list background tasks\n"
         "  cpus                    online CPUs: timer ticks, task runs and what each runs now\n"
         "  kill [ID]               stop background tasks (all, or task ID) and release their memory\n"
         "  free                    release what testlimit holds\n"
         "  ticks                   timer ticks since boot (" "100 per second)\n"
         "  balloon MB              take MB MiB out of the guest as the balloon driver would\n"
         "  unballoon               give back what `balloon` took\n"
         "  retouch MB              write to MB MiB of ballooned pages (misbehave: the host's memory)\n"
         "  dm reopen               close and reopen the DM channel (the balloon comes back)\n"
         "  dm deaf N               ignore the next N unballoon requests (misbehave: the host's timeout)\n"
         "  dm badhint              a free-page hint of ranges the host must refuse (misbehave)\n"
         "  hotadd BASE_MB SIZE_MB  add RAM at BASE_MB MiB, as a hot-add would\n"
         "  vmbus                   VMBus channels: offers, rings, counters\n"
         "  dm                      Dynamic Memory VSC: state, protocol, last status, counters\n"
         "  disk [test PAGES]       the page file's disk (synthetic storage); test: write PAGES pages, read back, check\n"
         "  paging                  the page file: size, slots in use, page-outs, page-ins\n"
         "  verify                  testlimit tasks that page check every page's pattern once more (see tasks)\n"
         "  pmmcheck                check the memory manager's counters against its bitmaps\n"
         "  fault kernel|user [CPU]  touch unmapped memory at CPL0 (halts) or in a CPL3 task (killed)\n"
         "  poweroff [CODE]         power off with exit status CODE (default 0)\n");
}

static void cmd_mem(void)
{
    struct pmm_stats s;
    pmm_stats(&s);
    printf("visible: %lu MiB\nfree: %lu MiB\ncommitted: %lu MiB\nballooned: %lu MiB\nhot-added: %lu MiB\n",
           s.visible / 256, s.free / 256, s.committed / 256, s.ballooned / 256, s.hot_added / 256);
}

/* a size argument in MiB, 1..65536 */
static int arg_mb(const char *cmd, const char *what, const char *s, u64 *out)
{
    if (!s || parse_u64(s, out) || *out == 0 || *out > 65536) {
        printf("%s: %s must be a number of MiB from 1 to 65536, got '%s'\n", cmd, what, s ? s : "");
        return -1;
    }
    return 0;
}

/* -p: one task per online CPU (each pinned), else one task on any CPU */
static void start_tasks(int per_cpu, int (*start)(u64, u64, s32), u64 a, u64 b)
{
    if (!per_cpu) {
        start(a, b, -1);
        return;
    }
    for (u32 i = 0; i < MAX_CPUS; i++)
        if (cpus[i].online && start(a, b, (s32)i) < 0)
            return;
}

static void cmd_testlimit(int argc, char **argv)
{
    u64 mb = 0, count = 1;
    int per_cpu = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-p")) {
            per_cpu = 1;
        } else if (!strcmp(argv[i], "-m") && i + 1 < argc) {
            if (arg_mb("testlimit", "-m", argv[++i], &mb))
                return;
        } else if (!strcmp(argv[i], "-c") && i + 1 < argc) {
            if (parse_u64(argv[++i], &count) || count == 0 || count > 65536) {
                printf("testlimit: -c must be a chunk count from 1 to 65536, got '%s'\n", argv[i]);
                return;
            }
        } else {
            printf("testlimit: unexpected argument '%s': usage testlimit -m MB [-c N] [-p]\n", argv[i]);
            return;
        }
    }
    if (!mb) {
        puts("testlimit: -m MB is required: usage testlimit -m MB [-c N] [-p]\n");
        return;
    }
    if (mb * count > 65536) {
        printf("testlimit: %lu x %lu MiB is more than the 64 GiB this guest can address\n", count, mb);
        return;
    }
    start_tasks(per_cpu, task_start_testlimit, mb, count);
}

/* a trailing "-c CPU": the CPU (an online one) in *pin, the arguments before it in *argc */
static int arg_cpu(const char *cmd, int *argc, char **argv, s32 *pin)
{
    u64 cpu;
    *pin = -1;
    if (*argc < 3 || strcmp(argv[*argc - 2], "-c"))
        return 0;
    if (parse_u64(argv[*argc - 1], &cpu) || cpu >= MAX_CPUS || !cpus[cpu].online) {
        printf("%s: -c must name an online CPU, got '%s' (see cpus)\n", cmd, argv[*argc - 1]);
        return -1;
    }
    *pin = (s32)cpu;
    *argc -= 2;
    return 0;
}

static void cmd_dirty(int argc, char **argv)
{
    u64 mb, pps = 0;
    s32 pin;
    int per_cpu = argc > 1 && !strcmp(argv[argc - 1], "-p");
    argc -= per_cpu;
    if (!per_cpu && arg_cpu("dirty", &argc, argv, &pin))
        return;
    if (argc < 2 || argc > 3) {
        puts("dirty: usage dirty MB [PAGES-PER-SECOND] [-p|-c CPU]\n");
        return;
    }
    if (arg_mb("dirty", "MB", argv[1], &mb))
        return;
    if (argc == 3 && (parse_u64(argv[2], &pps) || pps == 0)) {
        printf("dirty: pages per second must be a positive number, got '%s'\n", argv[2]);
        return;
    }
    if (!per_cpu && pin >= 0)
        task_start_dirty(mb, pps, pin);
    else
        start_tasks(per_cpu, task_start_dirty, mb, pps);
}

static void cmd_read(int argc, char **argv)
{
    u64 mb;
    s32 pin;
    if (arg_cpu("read", &argc, argv, &pin))
        return;
    if (argc != 2) {
        puts("read: usage read MB [-c CPU]\n");
        return;
    }
    if (!arg_mb("read", "MB", argv[1], &mb))
        task_start_read(mb, pin);
}

static void cmd_kill(int argc, char **argv)
{
    u64 id = 0;
    if (argc > 2 || (argc == 2 && (parse_u64(argv[1], &id) || id > 255))) {
        puts("kill: usage kill [TASK-ID]\n");
        return;
    }
    if (!task_kill(argc == 2 ? (int)id : -1))
        puts(argc == 2 ? "kill: no such task\n" : "kill: no tasks\n");
}

static void cmd_balloon(int argc, char **argv)
{
    u64 mb;
    if (argc != 2 || arg_mb("balloon", "MB", argv[1], &mb))
        return;
    u32 n;
    u64 got = pmm_balloon_take(mb * 256, pmm_balloon_floor(), &balloon_ranges[balloon_nranges],
                               DEBUG_RANGES - balloon_nranges, &n);
    balloon_nranges += n;
    printf("balloon: took %lu pages (%lu MiB) in %u ranges\n", got, got / 256, n);
}

static void cmd_unballoon(void)
{
    u64 pages = 0;
    for (u32 i = 0; i < balloon_nranges; i++)
        if (!pmm_balloon_give(balloon_ranges[i].base, balloon_ranges[i].pages))
            pages += balloon_ranges[i].pages;
    printf("unballoon: gave back %lu pages (%lu MiB) in %u ranges\n", pages, pages / 256, balloon_nranges);
    balloon_nranges = 0;
}

static void cmd_retouch(int argc, char **argv)
{
    u64 mb;
    if (argc != 2 || arg_mb("retouch", "MB", argv[1], &mb))
        return;
    u64 n = pmm_balloon_touch(mb * 256);
    printf("retouch: wrote %lu ballooned pages (%lu MiB)\n", n, n / 256);
}

static void cmd_hotadd(int argc, char **argv)
{
    u64 base, size;
    if (argc != 3 || parse_u64(argv[1], &base) || base >= 65536 || arg_mb("hotadd", "SIZE_MB", argv[2], &size)) {
        puts("hotadd: usage hotadd BASE_MB SIZE_MB (below 64 GiB)\n");
        return;
    }
    if (!pmm_hot_add(base << 20, size * 256))
        printf("hotadd: added %lu MiB at %lu MiB\n", size, base);
}

static void cmd_poweroff(int argc, char **argv)
{
    u64 code = 0;
    if (argc > 2 || (argc == 2 && (parse_u64(argv[1], &code) || code > 255))) {
        puts("poweroff: usage poweroff [CODE 0..255]\n");
        return;
    }
    puts("powering off\n");
    poweroff((u32)code);
}

static void cmd_fault(int argc, char **argv)
{
    u64 cpu;
    if (argc == 2 && !strcmp(argv[1], "user")) {
        task_start_fault(-1);
    } else if (argc == 3 && !strcmp(argv[1], "user") && !parse_u64(argv[2], &cpu) && cpu < MAX_CPUS &&
               cpus[cpu].online) {
        task_start_fault((s32)cpu);
    } else if (argc == 2 && !strcmp(argv[1], "kernel")) {
        printf("fault: reading %lx at CPL0\n", FAULT_ADDRESS);
        (void)*(volatile u64 *)FAULT_ADDRESS;
    } else {
        puts("fault: usage fault kernel|user [CPU]\n");
    }
}

static void cmd_disk(int argc, char **argv);

static void run(char *s)
{
    char *argv[MAX_ARGS];
    int argc = 0;
    while (*s) {
        while (*s == ' ' || *s == '\t')
            *s++ = 0;
        if (!*s)
            break;
        if (argc == MAX_ARGS) {
            printf("too many arguments (at most %d)\n", MAX_ARGS - 1);
            return;
        }
        argv[argc++] = s;
        while (*s && *s != ' ' && *s != '\t')
            s++;
    }
    if (!argc)
        return;
    const char *c = argv[0];
    if (!strcmp(c, "help"))
        cmd_help();
    else if (!strcmp(c, "mem"))
        cmd_mem();
    else if (!strcmp(c, "testlimit"))
        cmd_testlimit(argc, argv);
    else if (!strcmp(c, "dirty"))
        cmd_dirty(argc, argv);
    else if (!strcmp(c, "read"))
        cmd_read(argc, argv);
    else if (!strcmp(c, "tasks"))
        task_list();
    else if (!strcmp(c, "cpus"))
        cpus_show();
    else if (!strcmp(c, "kill"))
        cmd_kill(argc, argv);
    else if (!strcmp(c, "free")) {
        if (!task_kill_kind_testlimit())
            puts("free: testlimit holds nothing\n");
    } else if (!strcmp(c, "ticks"))
        printf("ticks: %lu\n", ticks);
    else if (!strcmp(c, "retouch"))
        cmd_retouch(argc, argv);
    else if (!strcmp(c, "balloon"))
        cmd_balloon(argc, argv);
    else if (!strcmp(c, "unballoon"))
        cmd_unballoon();
    else if (!strcmp(c, "hotadd"))
        cmd_hotadd(argc, argv);
    else if (!strcmp(c, "dm") && argc > 1)
        dmvsc_command(argc, argv);
    else if (!strcmp(c, "vmbus"))
        vmbus_show();
    else if (!strcmp(c, "dm"))
        dmvsc_show();
    else if (!strcmp(c, "disk"))
        cmd_disk(argc, argv);
    else if (!strcmp(c, "paging"))
        paging_show();
    else if (!strcmp(c, "verify"))
        printf("verify: %d testlimit tasks with a page file check their pages (see tasks)\n", task_verify());
    else if (!strcmp(c, "pmmcheck"))
        puts(pmm_check() ? "pmm: INCONSISTENT\n" : "pmm: consistent\n");
    else if (!strcmp(c, "fault"))
        cmd_fault(argc, argv);
    else if (!strcmp(c, "poweroff"))
        cmd_poweroff(argc, argv);
    else
        printf("unknown command '%s': type help for the list\n", c);
}

void shell_init(void) { prompt(); }

/* one page filled with `v` (rep stosq: one emulated instruction) / whether it still holds it */
static void fill_page(u64 pa, u64 v)
{
    u64 n = PAGE_SIZE / 8;
    void *d = (void *)pa;
    __asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(v) : "memory");
}
static int page_holds(u64 pa, u64 v)
{
    u64 n = PAGE_SIZE / 8;
    const void *d = (const void *)pa;
    u8 ne;
    __asm__ volatile("repe scasq; setne %2" : "+D"(d), "+c"(n), "=q"(ne) : "a"(v) : "memory", "cc");
    return !ne;
}

/* write `pages` pages to the disk from LBA 0 in requests of 16 pages, read them into other pages, check */
static void cmd_disk(int argc, char **argv)
{
    u64 pages;
    if (argc < 2) {
        storvsc_show();
        return;
    }
    if (strcmp(argv[1], "test") || argc < 3 || parse_u64(argv[2], &pages) || !pages) {
        puts("disk: usage disk [test PAGES]\n");
        return;
    }
    struct paging_stats ps;
    paging_get_stats(&ps);
    if (pages > storvsc_sectors() / 8) {
        printf("disk: %lu pages do not fit the disk's %lu\n", pages, storvsc_sectors() / 8);
        return;
    }
    if (ps.slots_used) {
        printf("disk: the page file holds %lu paged-out pages: not overwriting them\n", ps.slots_used);
        return;
    }
    struct pmm_range r[32];
    u64 pfn[32];
    u32 n, k = 0;
    u64 got = pmm_alloc(32, r, 32, &n);
    for (u32 i = 0; i < n; i++)
        for (u64 j = 0; j < r[i].pages; j++)
            pfn[k++] = r[i].base / PAGE_SIZE + j;
    if (got < 32) {
        puts("disk: no 32 free pages for the buffers\n");
        for (u32 i = 0; i < n; i++)
            pmm_free(r[i].base, r[i].pages);
        return;
    }
    pmm_commit(32);
    u64 bad = 0, errors = 0, seed = 0x9E3779B97F4A7C15UL * (ticks + 7);
    for (u64 g = 0; g < pages; g += 16) {
        u32 b = pages - g < 16 ? (u32)(pages - g) : 16;
        for (u32 i = 0; i < b; i++) {
            fill_page(pfn[i] * PAGE_SIZE, seed ^ (g + i));
            fill_page(pfn[16 + i] * PAGE_SIZE, 0);
        }
        if (storvsc_io(1, g * 8, b * 8, pfn, b) || storvsc_io(0, g * 8, b * 8, pfn + 16, b)) {
            errors++;
            continue;
        }
        for (u32 i = 0; i < b; i++)
            bad += !page_holds(pfn[16 + i] * PAGE_SIZE, seed ^ (g + i));
    }
    for (u32 i = 0; i < n; i++)
        pmm_free(r[i].base, r[i].pages);
    pmm_uncommit(32);
    printf("disk test: wrote %lu pages, read them back: %lu bad, %lu failed requests\n", pages, bad, errors);
}

void shell_input(int c)
{
    if (c == '\n' && last_cr) { /* \r\n is one Enter */
        last_cr = 0;
        return;
    }
    last_cr = c == '\r';
    if (c == '\r' || c == '\n') {
        putc('\n');
        line[len] = 0;
        run(line);
        len = 0;
        prompt();
    } else if (c == 8 || c == 127) {
        if (len) {
            len--;
            puts("\b \b");
        }
    } else if (c == 3) { /* ^C drops the line */
        puts("^C\n");
        len = 0;
        prompt();
    } else if (c >= 32 && c < 127 && len < LINE_MAX - 1) {
        line[len++] = (char)c;
        putc((char)c);
    }
}
