/* The VP run loop's hot path in C: KVM_RUN with the GIL released, and the port I/O, MMIO,
 * RDMSR and WRMSR exits delivered to the Python intercept handlers without the interpreter in
 * between.  Built at first use by pyhv/kvm/fastrun.py; pyhv/hypervisor/runloop.py keeps the
 * same loop in Python as the fallback, and this file does exactly what that loop does for these
 * four exits.
 *
 * It reads and writes only what pyhv/kvm/loopabi.py declares: the __slots__ of LoopOwner (vp),
 * Routes (table), Route and GpaRoute (its entries), IoAccess, MmioAccess and MsrAccess (the
 * messages), and calls back only LoopOwner's three methods.  The layer above fills them.
 *
 * Runner(fd, run_mmap, vp, table, io_msg, mem_msg, msr_msg, counts, defaults, handler_ns,
 *        timed, READ, WRITE)
 * Runner.run() -> int loops on KVM_RUN and returns
 *   -1  KVM_RUN failed with EINTR (a kick, or another signal): nothing is pending;
 *   -2  an exit was handled and vp._attention is set (the handler asked for a pause or stop,
 *       or completing the access found a new exit): look at the VP's requests;
 *   >=0 the exit reason of an exit left to Python, still untouched in kvm_run (other kinds,
 *       string I/O to a handler, malformed exits).
 * A handler that raises an Exception ends run() with the VpStopped that
 * vp._handler_failed(kind, what, e) returns, raised "from None" as the Python loop does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#ifndef KVM_EXIT_X86_RDMSR
#define KVM_EXIT_X86_RDMSR 29
#define KVM_EXIT_X86_WRMSR 30
#endif

/* counter indexes: loopabi.KIND_IO, KIND_MEMORY, KIND_MSR (read at import) */
static int K_IO, K_MEM, K_MSR;

/* what a hot-exit handler tells the loop */
enum { DONE = 0, DONE_PYTHON = 1, LEAVE = 2, FAILED = -1 };

/* Fields are read and written at their __slots__ offsets, found at import from the member
 * descriptors of the loopabi classes: what `obj.field = x` does, without the attribute lookup. */
enum { T_TABLE_IO, T_TABLE_GPA, T_TABLE_GPA_STARTS, T_TABLE_MSR,  /* Routes */
       E_HANDLER, E_READ, E_WRITE, G_END,                         /* Route, GpaRoute */
       IO_PORT, IO_SIZE, IO_COUNT, IO_TYPE, IO_VALUE,             /* IoAccess */
       MEM_GPA, MEM_GVA, MEM_SIZE, MEM_TYPE, MEM_VALUE,           /* MmioAccess */
       MSR_MSR, MSR_GP, MSR_TYPE, MSR_VALUE,                      /* MsrAccess */
       VP_TOUCHED, VP_ATTENTION,                                  /* LoopOwner */
       N_SLOTS };

/* the loopabi classes, in the order of `abi_names` */
enum { C_ROUTES, C_ROUTE, C_GPA_ROUTE, C_IO, C_MMIO, C_MSR, C_OWNER, N_CLASSES };
static const char *abi_names[N_CLASSES] = {"Routes", "Route", "GpaRoute", "IoAccess",
                                           "MmioAccess", "MsrAccess", "LoopOwner"};
static PyTypeObject *abi[N_CLASSES];
static Py_ssize_t slot_off[N_SLOTS];

typedef struct {
    PyObject_HEAD
    int fd;
    int timed;
    PyObject *mm;
    PyObject *vp, *table;
    PyObject *io_msg, *mem_msg, *msr_msg;
    PyObject *counts, *defaults, *handler_ns; /* array('q') */
    PyObject *read, *write;
    PyObject *msr_table, *msr_entry; /* the last MSR looked up: table.msr, its entry or NULL */
    uint32_t msr_index;
    PyObject *gpa_entries, *gpa_entry; /* the last GPA entry found: table.gpa, its item */
    uint64_t gpa_start, gpa_end;
    /* valid during run() only */
    struct kvm_run *run;
    Py_ssize_t run_size;
    int64_t *n_counts, *n_defaults, *n_handler_ns;
} Runner;

static PyObject *s_flush;

#define SLOT(obj, self, i) (*(PyObject **)((char *)(obj) + slot_off[i]))

static inline int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Handler time.  clock_gettime(CLOCK_MONOTONIC) is what time.perf_counter_ns() reads; on PVM
 * its vDSO data page is cold after every exit, and two reads cost ~1% of the exit rate.  When
 * the kernel's clocksource is the TSC (set_tsc(True): constant rate, synchronised across CPUs),
 * the TSC is read instead, converted with a rate measured against CLOCK_MONOTONIC over the
 * first CALIBRATION_NS of handler timing (all under the GIL). */
#if defined(__x86_64__) || defined(__i386__)
#define HAVE_TSC 1
static inline uint64_t rdtsc(void) { return __builtin_ia32_rdtsc(); }
#else
#define HAVE_TSC 0
static inline uint64_t rdtsc(void) { return 0; }
#endif
#define CALIBRATION_NS 50000000LL
static int tsc_allowed;  /* set_tsc(True) */
static int tsc_ready;    /* calibrated: stamps are TSC ticks */
static int64_t cal_ns0 = -1;
static uint64_t cal_tsc0;
static double ns_per_tick;

typedef struct {
    int64_t t;
    int tsc;
} stamp_t;

static inline stamp_t stamp(void)
{
    stamp_t s;
    s.tsc = tsc_ready;
    s.t = s.tsc ? (int64_t)rdtsc() : now_ns();
    return s;
}

static inline int64_t elapsed_ns(stamp_t s)
{
    if (s.tsc) {
        int64_t ticks = (int64_t)rdtsc() - s.t;
        return ticks > 0 ? (int64_t)((double)ticks * ns_per_tick) : 0;
    }
    int64_t t1 = now_ns();
    if (tsc_allowed && !tsc_ready) {
        uint64_t c = rdtsc();
        if (cal_ns0 < 0) {
            cal_ns0 = t1;
            cal_tsc0 = c;
        } else if (t1 - cal_ns0 >= CALIBRATION_NS && c > cal_tsc0) {
            ns_per_tick = (double)(t1 - cal_ns0) / (double)(c - cal_tsc0);
            tsc_ready = 1;
        }
    }
    return t1 - s.t;
}

/* obj.<slot> = v (a new reference, may be NULL after an error) */
static inline int slot_set(PyObject *obj, Py_ssize_t off, PyObject *v)
{
    if (v == NULL)
        return -1;
    PyObject **p = (PyObject **)((char *)obj + off);
    PyObject *old = *p;
    *p = v;
    Py_XDECREF(old);
    return 0;
}

/* obj.<slot> = v (borrowed), unless it already is v */
static inline void slot_put(PyObject *obj, Py_ssize_t off, PyObject *v)
{
    PyObject **p = (PyObject **)((char *)obj + off);
    PyObject *old = *p;
    if (old != v) {
        Py_INCREF(v);
        *p = v;
        Py_XDECREF(old);
    }
}

/* obj.<slot> = v for an int, keeping the int object there if it already has that value */
static inline int slot_set_u64(PyObject *obj, Py_ssize_t off, unsigned long long v)
{
    PyObject *old = *(PyObject **)((char *)obj + off);
    if (old != NULL && PyLong_CheckExact(old)) {
        unsigned long long o = PyLong_AsUnsignedLongLong(old);
        if (o == v && !(o == (unsigned long long)-1 && PyErr_Occurred()))
            return 0;
        PyErr_Clear();
    }
    return slot_set(obj, off, PyLong_FromUnsignedLongLong(v));
}

/* a slot's value as a new reference; NULL (no exception) if it is unset */
static inline PyObject *slot_get(PyObject *obj, Py_ssize_t off)
{
    PyObject *v = *(PyObject **)((char *)obj + off);
    Py_XINCREF(v);
    return v;
}

static inline int truth(PyObject *o)
{
    return o == Py_True ? 1 : o == Py_False ? 0 : PyObject_IsTrue(o);
}

/* A handler (or the check of its result) raised: raise vp._handler_failed(kind, what, e) from
 * None, the VpStopped that ends the VP thread.  Only Exception subclasses: anything else (e.g.
 * KeyboardInterrupt) goes up as it is, like `except Exception` in the Python loop. */
static int handler_failed(Runner *self, int kind, const char *what)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return FAILED;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *type = NULL, *tb = NULL, *value = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
#endif
    PyObject *stop = PyObject_CallMethod(self->vp, "_handler_failed", "isO", kind, what, value);
    if (stop == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return FAILED;
    }
    if (PyExceptionInstance_Check(stop)) {
        PyException_SetContext(stop, value); /* steals value */
        value = NULL;
        PyException_SetCause(stop, NULL); /* `from None`: also sets __suppress_context__ */
        PyErr_SetObject((PyObject *)Py_TYPE(stop), stop);
    } else {
        PyErr_SetString(PyExc_TypeError, "_handler_failed must return an exception");
    }
    Py_DECREF(stop);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return FAILED;
}

static void not_an_int(PyObject *result)
{
    PyObject *name = PyType_GetName(Py_TYPE(result));
    if (name != NULL) {
        PyErr_Format(PyExc_TypeError, "a read handler must return an int, not %U", name);
        Py_DECREF(name);
    }
}

/* The table entry's handler if the access is intercepted (new reference), NULL if it is not
 * (the default treatment), or LEAVE_ENTRY if the entry is not one of ours (Python decides). */
static PyObject leave_entry_marker;
#define LEAVE_ENTRY (&leave_entry_marker)

static PyObject *entry_handler(Runner *self, PyObject *entry, int is_write)
{
    if (!PyObject_TypeCheck(entry, abi[C_ROUTE]))
        return LEAVE_ENTRY;
    PyObject *flag = SLOT(entry, self, is_write ? E_WRITE : E_READ);
    PyObject *handler = SLOT(entry, self, E_HANDLER);
    if (flag == NULL || handler == NULL)
        return LEAVE_ENTRY;
    int allowed = truth(flag);
    if (allowed < 0) {
        PyErr_Clear();
        return LEAVE_ENTRY;
    }
    if (!allowed)
        return NULL;
    Py_INCREF(handler);
    return handler;
}

/* ------------------------------------------------------------------ KVM_EXIT_IO */
static int io_exit(Runner *self)
{
    struct kvm_run *run = self->run;
    uint8_t *page = (uint8_t *)run;
    unsigned port = run->io.port, size = run->io.size;
    uint32_t count = run->io.count;
    uint64_t off = run->io.data_offset;
    int is_write = run->io.direction == KVM_EXIT_IO_OUT;
    uint64_t n = (uint64_t)size * count;
    if (off == 0 || off > (uint64_t)self->run_size || n > (uint64_t)self->run_size - off ||
        (off & 3))
        return LEAVE; /* the Python loop reports it */
    PyObject *io = SLOT(self->table, self, T_TABLE_IO);
    if (io == NULL || !PyList_CheckExact(io) || PyList_GET_SIZE(io) != 0x10000)
        return LEAVE;
    PyObject *entry = PyList_GET_ITEM(io, port);
    PyObject *handler = entry == Py_None ? NULL : entry_handler(self, entry, is_write);
    if (handler == LEAVE_ENTRY)
        return LEAVE;
    if (handler == NULL) {
        self->n_defaults[K_IO]++;
        if (!is_write)
            memset(page + off, 0xff, n); /* open bus: reads return all ones */
        self->n_counts[K_IO]++;
        return DONE;
    }
    if (count != 1 || (size != 1 && size != 2 && size != 4)) {
        Py_DECREF(handler);
        return LEAVE; /* string I/O: the Python loop builds `data` */
    }
    PyObject *m = self->io_msg;
    uint64_t value = 0;
    if (is_write)
        value = size == 1   ? page[off]
                : size == 2 ? *(uint16_t *)(page + off)
                            : *(uint32_t *)(page + off);
    if (slot_set_u64(m, slot_off[IO_PORT], port) < 0 ||
        slot_set_u64(m, slot_off[IO_SIZE], size) < 0 ||
        slot_set_u64(m, slot_off[IO_COUNT], count) < 0 ||
        (slot_put(m, slot_off[IO_TYPE], is_write ? self->write : self->read), 0) < 0 ||
        slot_set_u64(m, slot_off[IO_VALUE], value) < 0) {
        Py_DECREF(handler);
        return FAILED;
    }
    stamp_t t0 = self->timed ? stamp() : (stamp_t){0, 0};
    PyObject *result = PyObject_CallOneArg(handler, m);
    Py_DECREF(handler);
    if (result == NULL) {
        char what[32];
        snprintf(what, sizeof what, "I/O port 0x%x", port);
        return handler_failed(self, K_IO, what);
    }
    if (self->timed)
        self->n_handler_ns[K_IO] += elapsed_ns(t0);
    if (!is_write) {
        if (PyLong_CheckExact(result)) {
            uint64_t v = PyLong_AsUnsignedLongLongMask(result);
            if (size == 1)
                page[off] = (uint8_t)v;
            else if (size == 2)
                *(uint16_t *)(page + off) = (uint16_t)v;
            else
                *(uint32_t *)(page + off) = (uint32_t)v;
        } else {
            /* bytes, or an int subclass: the Python loop's checks and messages */
            PyObject *r = PyObject_CallMethod(self->vp, "_fill_io_read", "OKIII", result,
                                              (unsigned long long)off, size, count, port);
            if (r == NULL) {
                Py_DECREF(result);
                return FAILED;
            }
            Py_DECREF(r);
        }
    }
    Py_DECREF(result);
    self->n_counts[K_IO]++;
    return DONE_PYTHON;
}

/* ------------------------------------------------------------------ KVM_EXIT_MMIO */
static int mmio_exit(Runner *self)
{
    struct kvm_run *run = self->run;
    uint64_t gpa = run->mmio.phys_addr;
    uint32_t n = run->mmio.len;
    int is_write = run->mmio.is_write != 0;
    if (n < 1 || n > 8)
        return LEAVE;
    PyObject *entries = SLOT(self->table, self, T_TABLE_GPA);
    PyObject *entry = NULL;
    uint64_t e = 0;
    if (entries != NULL && entries == self->gpa_entries && gpa >= self->gpa_start &&
        gpa < self->gpa_end) {
        /* the entry of the last MMIO exit (tables are replaced, never changed in place) */
        entry = self->gpa_entry;
        e = self->gpa_end;
    } else {
        PyObject *starts = SLOT(self->table, self, T_TABLE_GPA_STARTS);
        if (starts == NULL || entries == NULL || !PyTuple_CheckExact(starts) ||
            !PyTuple_CheckExact(entries) ||
            PyTuple_GET_SIZE(starts) != PyTuple_GET_SIZE(entries))
            return LEAVE; /* tables being replaced: the Python loop copes */
        /* bisect_right(starts, gpa) - 1 */
        Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(starts);
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            uint64_t st = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(starts, mid));
            if (gpa < st)
                hi = mid;
            else
                lo = mid + 1;
        }
        if (lo > 0) {
            entry = PyTuple_GET_ITEM(entries, lo - 1);
            if (!PyObject_TypeCheck(entry, abi[C_GPA_ROUTE]))
                return LEAVE;
            PyObject *end = SLOT(entry, self, G_END);
            PyObject *start = PyTuple_GET_ITEM(starts, lo - 1);
            if (end == NULL || !PyLong_Check(end))
                return LEAVE;
            e = PyLong_AsUnsignedLongLongMask(end);
            /* remember it: the tuple keeps the entry alive */
            Py_INCREF(entries);
            Py_XSETREF(self->gpa_entries, entries);
            self->gpa_entry = entry;
            self->gpa_start = PyLong_AsUnsignedLongLongMask(start);
            self->gpa_end = e;
        }
    }
    PyObject *handler = NULL;
    if (entry != NULL && gpa + n <= e) {
        handler = entry_handler(self, entry, is_write);
        if (handler == LEAVE_ENTRY)
            return LEAVE;
    }
    if (handler == NULL) {
        self->n_defaults[K_MEM]++;
        if (!is_write)
            memset(run->mmio.data, 0xff, n); /* unmapped GPA reads as all ones */
        self->n_counts[K_MEM]++;
        return DONE;
    }
    PyObject *m = self->mem_msg;
    uint64_t value = 0;
    if (is_write)
        memcpy(&value, run->mmio.data, n); /* little endian */
    if (slot_set_u64(m, slot_off[MEM_GPA], gpa) < 0 ||
        (slot_put(m, slot_off[MEM_GVA], Py_None), 0) < 0 ||
        slot_set_u64(m, slot_off[MEM_SIZE], n) < 0 ||
        (slot_put(m, slot_off[MEM_TYPE], is_write ? self->write : self->read), 0) < 0 ||
        slot_set_u64(m, slot_off[MEM_VALUE], value) < 0) {
        Py_DECREF(handler);
        return FAILED;
    }
    stamp_t t0 = self->timed ? stamp() : (stamp_t){0, 0};
    PyObject *result = PyObject_CallOneArg(handler, m);
    Py_DECREF(handler);
    if (result != NULL && !is_write) {
        if (!PyLong_Check(result)) {
            not_an_int(result);
            Py_CLEAR(result);
        } else {
            uint64_t v = PyLong_AsUnsignedLongLongMask(result);
            if (v == (uint64_t)-1 && PyErr_Occurred())
                Py_CLEAR(result);
            else
                memcpy(run->mmio.data, &v, n);
        }
    }
    if (result == NULL) {
        char what[40];
        snprintf(what, sizeof what, "GPA 0x%llx", (unsigned long long)gpa);
        return handler_failed(self, K_MEM, what);
    }
    Py_DECREF(result);
    if (self->timed)
        self->n_handler_ns[K_MEM] += elapsed_ns(t0);
    self->n_counts[K_MEM]++;
    return DONE_PYTHON;
}

/* ------------------------------------------------------------------ KVM_EXIT_X86_RDMSR/WRMSR */
static int msr_exit(Runner *self, int is_write)
{
    struct kvm_run *run = self->run;
    uint32_t index = run->msr.index;
    PyObject *table = SLOT(self->table, self, T_TABLE_MSR);
    if (table == NULL || !PyDict_CheckExact(table))
        return LEAVE;
    /* Tables are replaced, never changed in place: the last lookup holds while the same
     * dict (kept alive here, so its address cannot be reused) is installed. */
    PyObject *entry;
    if (table == self->msr_table && index == self->msr_index) {
        entry = self->msr_entry;
    } else {
        PyObject *key = PyLong_FromUnsignedLong(index);
        if (key == NULL)
            return FAILED;
        entry = PyDict_GetItemWithError(table, key); /* borrowed */
        Py_DECREF(key);
        if (entry == NULL && PyErr_Occurred())
            return FAILED;
        Py_INCREF(table);
        Py_XSETREF(self->msr_table, table);
        Py_XINCREF(entry);
        Py_XSETREF(self->msr_entry, entry);
        self->msr_index = index;
    }
    PyObject *handler = entry == NULL ? NULL : entry_handler(self, entry, is_write);
    if (handler == LEAVE_ENTRY)
        return LEAVE;
    if (handler == NULL) {
        /* KVM sent an MSR it does not know (or could not handle): #GP, as hardware does */
        self->n_defaults[K_MSR]++;
        run->msr.error = 1;
        self->n_counts[K_MSR]++;
        return DONE;
    }
    PyObject *m = self->msr_msg;
    if (slot_set_u64(m, slot_off[MSR_MSR], index) < 0 ||
        (slot_put(m, slot_off[MSR_GP], Py_False), 0) < 0 ||
        (slot_put(m, slot_off[MSR_TYPE], is_write ? self->write : self->read), 0) < 0 ||
        slot_set_u64(m, slot_off[MSR_VALUE], is_write ? run->msr.data : 0) < 0) {
        Py_DECREF(handler);
        return FAILED;
    }
    stamp_t t0 = self->timed ? stamp() : (stamp_t){0, 0};
    PyObject *result = PyObject_CallOneArg(handler, m);
    Py_DECREF(handler);
    int gp = 0;
    if (result != NULL) {
        PyObject *g = SLOT(m, self, MSR_GP);
        gp = g == NULL ? 0 : truth(g);
        if (gp < 0) {
            Py_DECREF(result);
            return FAILED;
        }
        if (!is_write && !gp && !PyLong_Check(result)) {
            not_an_int(result);
            Py_CLEAR(result);
        }
    }
    if (result == NULL) {
        char what[32];
        snprintf(what, sizeof what, "MSR 0x%x", index);
        return handler_failed(self, K_MSR, what);
    }
    if (self->timed)
        self->n_handler_ns[K_MSR] += elapsed_ns(t0);
    if (gp) {
        run->msr.error = 1;
    } else {
        run->msr.error = 0;
        if (!is_write) {
            uint64_t v = PyLong_AsUnsignedLongLongMask(result);
            if (v == (uint64_t)-1 && PyErr_Occurred()) {
                Py_DECREF(result);
                return FAILED;
            }
            run->msr.data = v;
        }
    }
    Py_DECREF(result);
    self->n_counts[K_MSR]++;
    return DONE_PYTHON;
}

/* After an exit that ran a handler: write back what it changed (vp._flush_exit_changes, if
 * it touched VP state), then 1 if the VP needs attention (vp._attention), 0 if not. */
static int after_handler(Runner *self)
{
    PyObject *t = SLOT(self->vp, self, VP_TOUCHED);
    int touched = t == NULL ? 0 : truth(t);
    if (touched < 0)
        return -1;
    if (touched) {
        PyObject *r = PyObject_CallMethodNoArgs(self->vp, s_flush);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    PyObject *a = SLOT(self->vp, self, VP_ATTENTION);
    return a == NULL ? 0 : truth(a);
}

static int get_counters(PyObject *array, Py_buffer *view, int64_t **out)
{
    if (PyObject_GetBuffer(array, view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || view->format == NULL || strcmp(view->format, "q") != 0 ||
        view->len < 3 * 8) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "counters must be array('q') with an item per kind");
        return -1;
    }
    *out = (int64_t *)view->buf;
    return 0;
}

static PyObject *Runner_run(Runner *self, PyObject *Py_UNUSED(ignored))
{
    Py_buffer view, vc, vd, vh;
    if (PyObject_GetBuffer(self->mm, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (view.len < (Py_ssize_t)sizeof(struct kvm_run)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "the kvm_run mapping is too small");
        return NULL;
    }
    if (get_counters(self->counts, &vc, &self->n_counts) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (get_counters(self->defaults, &vd, &self->n_defaults) < 0) {
        PyBuffer_Release(&vc);
        PyBuffer_Release(&view);
        return NULL;
    }
    if (get_counters(self->handler_ns, &vh, &self->n_handler_ns) < 0) {
        PyBuffer_Release(&vd);
        PyBuffer_Release(&vc);
        PyBuffer_Release(&view);
        return NULL;
    }
    self->run = (struct kvm_run *)view.buf;
    self->run_size = view.len;
    long ret = 0;
    int failed = 0;
    for (;;) {
        int r, err;
        Py_BEGIN_ALLOW_THREADS
        r = ioctl(self->fd, KVM_RUN, 0);
        err = errno;
        Py_END_ALLOW_THREADS
        if (r < 0) {
            if (err == EINTR) {
                ret = -1;
                break;
            }
            if (err == EAGAIN) /* a VP that took INIT/SIPI: KVM_RUN again runs it */
                continue;
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            failed = 1;
            break;
        }
        int rc;
        switch (self->run->exit_reason) {
        case KVM_EXIT_IO:
            rc = io_exit(self);
            break;
        case KVM_EXIT_MMIO:
            rc = mmio_exit(self);
            break;
        case KVM_EXIT_X86_RDMSR:
            rc = msr_exit(self, 0);
            break;
        case KVM_EXIT_X86_WRMSR:
            rc = msr_exit(self, 1);
            break;
        default:
            rc = LEAVE;
        }
        if (rc == DONE)
            continue;
        if (rc == LEAVE) {
            ret = (long)self->run->exit_reason;
            break;
        }
        if (rc == FAILED) {
            failed = 1;
            break;
        }
        int attention = after_handler(self);
        if (attention < 0) {
            failed = 1;
            break;
        }
        if (attention) {
            ret = -2;
            break;
        }
    }
    self->run = NULL;
    self->n_counts = self->n_defaults = self->n_handler_ns = NULL;
    PyBuffer_Release(&vh);
    PyBuffer_Release(&vd);
    PyBuffer_Release(&vc);
    PyBuffer_Release(&view);
    return failed ? NULL : PyLong_FromLong(ret);
}

/* ------------------------------------------------------------------ the type */

/* The __slots__ offset of cls.name, or -1 with TypeError if it is not a writable slot. */
static Py_ssize_t slot_offset(PyObject *cls, const char *name)
{
    PyObject *d = PyObject_GetAttrString(cls, name);
    if (d == NULL)
        return -1;
    Py_ssize_t off = -1;
    if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *md = ((PyMemberDescrObject *)d)->d_member;
        if (md->type == T_OBJECT_EX && !(md->flags & READONLY))
            off = md->offset;
    }
    Py_DECREF(d);
    if (off < 0)
        PyErr_Format(PyExc_TypeError, "%R.%s is not a __slots__ field", cls, name);
    return off;
}

/* each slot: its loopabi class and its name */
static const struct {
    int cls;
    const char *name;
} fields[N_SLOTS] = {
    [T_TABLE_IO] = {C_ROUTES, "io"}, [T_TABLE_GPA] = {C_ROUTES, "gpa"},
    [T_TABLE_GPA_STARTS] = {C_ROUTES, "gpa_starts"}, [T_TABLE_MSR] = {C_ROUTES, "msr"},
    [E_HANDLER] = {C_ROUTE, "handler"}, [E_READ] = {C_ROUTE, "read"},
    [E_WRITE] = {C_ROUTE, "write"}, [G_END] = {C_GPA_ROUTE, "end"},
    [IO_PORT] = {C_IO, "port"}, [IO_SIZE] = {C_IO, "access_size"},
    [IO_COUNT] = {C_IO, "count"}, [IO_TYPE] = {C_IO, "access_type"},
    [IO_VALUE] = {C_IO, "value"},
    [MEM_GPA] = {C_MMIO, "gpa"}, [MEM_GVA] = {C_MMIO, "gva"},
    [MEM_SIZE] = {C_MMIO, "access_size"}, [MEM_TYPE] = {C_MMIO, "access_type"},
    [MEM_VALUE] = {C_MMIO, "value"},
    [MSR_MSR] = {C_MSR, "msr"}, [MSR_GP] = {C_MSR, "gp"}, [MSR_TYPE] = {C_MSR, "access_type"},
    [MSR_VALUE] = {C_MSR, "value"},
    [VP_TOUCHED] = {C_OWNER, "_touched"}, [VP_ATTENTION] = {C_OWNER, "_attention"},
};

/* Once, at import: the loopabi classes, the offsets of their slots, the counter indexes. */
static int load_abi(void)
{
    static const struct {
        int *where;
        const char *name;
    } kinds[] = {{&K_IO, "KIND_IO"}, {&K_MEM, "KIND_MEMORY"}, {&K_MSR, "KIND_MSR"}};
    PyObject *mod = PyImport_ImportModule("pyhv.kvm.loopabi");
    if (mod == NULL)
        return -1;
    for (int i = 0; i < N_CLASSES; i++) {
        PyObject *cls = PyObject_GetAttrString(mod, abi_names[i]);
        if (cls == NULL)
            goto fail;
        if (!PyType_Check(cls)) {
            PyErr_Format(PyExc_TypeError, "pyhv.kvm.loopabi.%s is not a class", abi_names[i]);
            Py_DECREF(cls);
            goto fail;
        }
        Py_XSETREF(abi[i], (PyTypeObject *)cls); /* kept for the module's life */
    }
    for (int i = 0; i < N_SLOTS; i++) {
        slot_off[i] = slot_offset((PyObject *)abi[fields[i].cls], fields[i].name);
        if (slot_off[i] < 0)
            goto fail;
    }
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        PyObject *v = PyObject_GetAttrString(mod, kinds[i].name);
        if (v == NULL)
            goto fail;
        long k = PyLong_AsLong(v);
        Py_DECREF(v);
        if (k == -1 && PyErr_Occurred())
            goto fail;
        if (k < 0 || k > 2) {
            PyErr_Format(PyExc_ValueError, "pyhv.kvm.loopabi.%s = %ld is not 0-2", kinds[i].name, k);
            goto fail;
        }
        *kinds[i].where = (int)k;
    }
    Py_DECREF(mod);
    return 0;
fail:
    Py_DECREF(mod);
    return -1;
}

/* obj is an instance of the loopabi class, and its class hides none of the declared slots
 * (a property or class attribute of the same name would not see what the loop writes). */
static int check_type(PyObject *obj, int cls, const char *arg)
{
    if (!PyObject_TypeCheck(obj, abi[cls])) {
        PyErr_Format(PyExc_TypeError, "%s must be a pyhv.kvm.loopabi.%s, not %.100s", arg,
                     abi_names[cls], Py_TYPE(obj)->tp_name);
        return -1;
    }
    for (int i = 0; i < N_SLOTS; i++) {
        if (fields[i].cls != cls)
            continue;
        PyObject *declared = PyObject_GetAttrString((PyObject *)abi[cls], fields[i].name);
        PyObject *seen = PyObject_GetAttrString((PyObject *)Py_TYPE(obj), fields[i].name);
        int same = declared != NULL && declared == seen;
        Py_XDECREF(declared);
        Py_XDECREF(seen);
        if (!same) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "%.100s hides the slot %s declared by pyhv.kvm.loopabi.%s: the run loop "
                         "writes the slot, so remove the attribute of that name from the class",
                         Py_TYPE(obj)->tp_name, fields[i].name, abi_names[cls]);
            return -1;
        }
    }
    return 0;
}

static int Runner_init(Runner *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "run_mmap", "vp", "table", "io_msg", "mem_msg", "msr_msg",
                             "counts", "defaults", "handler_ns", "timed", "read", "write", NULL};
    int fd, timed;
    PyObject *mm, *vp, *table, *io_msg, *mem_msg, *msr_msg, *counts, *defaults, *handler_ns,
        *read, *write;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOOOOOOOOpOO", kwlist, &fd, &mm, &vp, &table,
                                     &io_msg, &mem_msg, &msr_msg, &counts, &defaults,
                                     &handler_ns, &timed, &read, &write))
        return -1;
    if (check_type(vp, C_OWNER, "vp") < 0 || check_type(table, C_ROUTES, "table") < 0 ||
        check_type(io_msg, C_IO, "io_msg") < 0 || check_type(mem_msg, C_MMIO, "mem_msg") < 0 ||
        check_type(msr_msg, C_MSR, "msr_msg") < 0)
        return -1;
    self->fd = fd;
    self->timed = timed;
#define TAKE(f) Py_INCREF(f); Py_XSETREF(self->f, f)
    TAKE(mm); TAKE(vp); TAKE(table); TAKE(io_msg); TAKE(mem_msg); TAKE(msr_msg);
    TAKE(counts); TAKE(defaults); TAKE(handler_ns); TAKE(read); TAKE(write);
#undef TAKE
    return 0;
}

static int Runner_traverse(Runner *self, visitproc visit, void *arg)
{
    Py_VISIT(self->mm); Py_VISIT(self->vp); Py_VISIT(self->table); Py_VISIT(self->io_msg);
    Py_VISIT(self->mem_msg); Py_VISIT(self->msr_msg); Py_VISIT(self->counts);
    Py_VISIT(self->defaults); Py_VISIT(self->handler_ns); Py_VISIT(self->read);
    Py_VISIT(self->write); Py_VISIT(self->msr_table); Py_VISIT(self->msr_entry); Py_VISIT(self->gpa_entries);
    return 0;
}

static int Runner_clear(Runner *self)
{
    Py_CLEAR(self->mm); Py_CLEAR(self->vp); Py_CLEAR(self->table); Py_CLEAR(self->io_msg);
    Py_CLEAR(self->mem_msg); Py_CLEAR(self->msr_msg); Py_CLEAR(self->counts);
    Py_CLEAR(self->defaults); Py_CLEAR(self->handler_ns); Py_CLEAR(self->read);
    Py_CLEAR(self->write); Py_CLEAR(self->msr_table); Py_CLEAR(self->msr_entry); Py_CLEAR(self->gpa_entries);
    return 0;
}

static void Runner_dealloc(Runner *self)
{
    PyObject_GC_UnTrack(self);
    Runner_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *set_tsc(PyObject *mod, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    tsc_allowed = on && HAVE_TSC;
    if (!tsc_allowed)
        tsc_ready = 0;
    return PyBool_FromLong(tsc_allowed);
}

static PyObject *tsc_rate(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    if (!tsc_ready)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(ns_per_tick);
}

static PyMethodDef module_methods[] = {
    {"set_tsc", set_tsc, METH_O,
     "Time handlers by the TSC (calibrated against CLOCK_MONOTONIC) if True; returns whether "
     "it will."},
    {"tsc_rate", tsc_rate, METH_NOARGS, "Nanoseconds per TSC tick once calibrated, else None."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Runner_methods[] = {
    {"run", (PyCFunction)Runner_run, METH_NOARGS,
     "Loop on KVM_RUN: -1 after EINTR, -2 when the VP needs attention, else the reason of an "
     "exit left to Python."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyhv.kvm._runloop.Runner",
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A VP's run loop in C (see pyhv/kvm/_runloop.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Runner_init,
    .tp_dealloc = (destructor)Runner_dealloc,
    .tp_traverse = (traverseproc)Runner_traverse,
    .tp_clear = (inquiry)Runner_clear,
    .tp_methods = Runner_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_runloop",
    .m_doc = "The VP run loop's hot path in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__runloop(void)
{
#define INTERN(v, s) if ((v = PyUnicode_InternFromString(s)) == NULL) return NULL
    INTERN(s_flush, "_flush_exit_changes");
#undef INTERN
    if (load_abi() < 0)
        return NULL;
    if (PyType_Ready(&RunnerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RunnerType);
    if (PyModule_AddObject(m, "Runner", (PyObject *)&RunnerType) < 0) {
        Py_DECREF(&RunnerType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "EINTR", -1) < 0 || PyModule_AddIntConstant(m, "ATTENTION", -2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
