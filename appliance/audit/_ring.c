/* The shared-memory ring between the API process and its audit writer process (appliance.audit.ring).
 *
 * Why: at ~20,000 audit events/s a feeder thread that pickled events into a pipe took the API
 * process's GIL hundreds of times a second, and each handoff could delay a face match. Here put_event
 * packs an AuditEvent in C straight into a ring in a memfd both processes map: no thread, no syscall
 * per event. The writer process polls the ring, decodes records in C (take) and releases their space
 * (release) only after its COPY has committed them.
 *
 * What: every function takes the ring's buffer (any writable, contiguous, 8-byte aligned buffer: an
 * mmap) first. Its header is 192 bytes of native little-endian u64s:
 *     0 magic "APLRING1"    8 capacity = len(buf) - 192
 *    64 write_pos (stream bytes ever written; stored by the producer only, RELEASE, after the data)
 *    72 write_count (records ever written)
 *   128 read_pos (stream position released by the consumer; stored by release only, RELEASE)
 *   136 read_count (records ever released)
 * Stream byte i lives at buf[192 + i % capacity]; a record may wrap around the end. A record is
 *     u32 n (= 1 + payload length) | u8 kind | payload
 * with kind 'E' (a packed event, below), 'P' (pickled bytes, put_event's fallback) or 'F' (a flush
 * marker: payload u64 id). A record of more than MAX_RECORD bytes (4 + n) is never written. The
 * producer writes a record only when capacity - (write_pos - read_pos) >= 4 + n.
 *
 * An 'E' payload: i64 micros since the epoch | u8 flags | str action | str actor | str outcome |
 * subject (16 bytes of the UUID's int, little-endian, or a str, or nothing) | [str object_id] |
 * [str request_id] | [u32 count, then count x (str key | u8 tag | value)], where a str is u32 length |
 * UTF-8, flags say which optional parts are there (SUBJECT_*, HAS_*), and a detail value is tagged
 * 'N' None, 'T' True, 'F' False, 'I' i64, 'D' the 8 raw bytes of a double, 'S' a str. take() returns
 * what appliance.audit.chain.event_tuple returns for the event, with identical types.
 * tests/audit/test_ring.py checks the round trip.
 *
 * Threads: every call runs with the GIL held and never releases it, so producer calls from several
 * Python threads are serialised by the GIL (a free-threaded build would need a lock around the room
 * check and the copy). One consumer per ring. Across processes, write_pos and read_pos are the only
 * synchronisation: each side stores its own with RELEASE and loads the other's with ACQUIRE.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ring's layout is little-endian: this module is built for little-endian hosts only"
#endif

#define HEADER 192
#define MIN_CAPACITY 4096
#define MAX_RECORD 65536 /* 4 + n */
#define MAX_DETAILS 65534
#define OFF_MAGIC 0
#define OFF_CAPACITY 8
#define OFF_WRITE_POS 64
#define OFF_WRITE_COUNT 72
#define OFF_READ_POS 128
#define OFF_READ_COUNT 136

static const char MAGIC[8] = {'A', 'P', 'L', 'R', 'I', 'N', 'G', '1'};

enum { SUBJECT_NONE = 0, SUBJECT_UUID = 1, SUBJECT_STR = 2, SUBJECT_MASK = 3, HAS_OBJECT = 4, HAS_REQUEST = 8,
       HAS_DETAILS = 16, FLAGS_KNOWN = 31 };

/* the event's attributes, read in this order (interned at import) */
enum { A_ACTION, A_ACTOR, A_OUTCOME, A_SUBJECT, A_OBJECT, A_REQUEST, A_DETAILS, A_TS, N_ATTRS };
static const char *const ATTR_NAMES[N_ATTRS] = {"action", "actor", "outcome", "subject_id", "object_id",
                                                "request_id", "details", "ts"};
static PyObject *attr_names[N_ATTRS];
static PyObject *str_int;        /* "int" */
static PyTypeObject *uuid_type;  /* uuid.UUID */

/* --- the ring's buffer and header --------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    unsigned char *base, *data;
    uint64_t cap;
} Ring;

static inline uint64_t *field(const Ring *r, size_t off)
{
    return (uint64_t *)(void *)(r->base + off);
}

static inline uint64_t load_acquire(const Ring *r, size_t off)
{
    return __atomic_load_n(field(r, off), __ATOMIC_ACQUIRE);
}

static inline uint64_t load_relaxed(const Ring *r, size_t off)
{
    return __atomic_load_n(field(r, off), __ATOMIC_RELAXED);
}

static inline void store_release(const Ring *r, size_t off, uint64_t v)
{
    __atomic_store_n(field(r, off), v, __ATOMIC_RELEASE);
}

static inline void store_relaxed(const Ring *r, size_t off, uint64_t v)
{
    __atomic_store_n(field(r, off), v, __ATOMIC_RELAXED);
}

/* Borrow obj's buffer as a ring (released by ring_close); `initialised`: also check magic and capacity. */
static int ring_open(PyObject *obj, Ring *r, int initialised)
{
    if (PyObject_GetBuffer(obj, &r->view, PyBUF_WRITABLE) < 0)
        return -1;
    const char *why = NULL;
    r->base = r->view.buf;
    r->data = r->base + HEADER;
    r->cap = r->view.len > HEADER ? (uint64_t)(r->view.len - HEADER) : 0;
    if (r->view.len < HEADER + MIN_CAPACITY)
        why = "ring buffer is smaller than 192 + 4096 bytes";
    else if (((uintptr_t)r->base & 7) != 0)
        why = "ring buffer is not 8-byte aligned";
    else if (initialised && memcmp(r->base + OFF_MAGIC, MAGIC, sizeof(MAGIC)) != 0)
        why = "buffer is not an initialised ring (bad magic)";
    else if (initialised && load_relaxed(r, OFF_CAPACITY) != r->cap)
        why = "ring capacity in the header does not match the buffer's length";
    if (why != NULL) {
        PyBuffer_Release(&r->view);
        PyErr_SetString(PyExc_ValueError, why);
        return -1;
    }
    return 0;
}

static inline void ring_close(Ring *r)
{
    PyBuffer_Release(&r->view);
}

/* Copy n stream bytes at pos in or out, in two parts when they wrap. */
static void ring_put(const Ring *r, uint64_t pos, const void *src, size_t n)
{
    size_t at = (size_t)(pos % r->cap), first = (size_t)r->cap - at;
    if (n <= first)
        memcpy(r->data + at, src, n);
    else {
        memcpy(r->data + at, src, first);
        memcpy(r->data, (const unsigned char *)src + first, n - first);
    }
}

static void ring_get(const Ring *r, uint64_t pos, void *dst, size_t n)
{
    size_t at = (size_t)(pos % r->cap), first = (size_t)r->cap - at;
    if (n <= first)
        memcpy(dst, r->data + at, n);
    else {
        memcpy(dst, r->data + at, first);
        memcpy((unsigned char *)dst + first, r->data, n - first);
    }
}

/* The producer's view: 1 room for `need` bytes at *write_pos, 0 none, -1 a corrupt header (raised). */
static int ring_room(const Ring *r, uint64_t need, uint64_t *write_pos)
{
    uint64_t w = load_relaxed(r, OFF_WRITE_POS), rd = load_acquire(r, OFF_READ_POS);
    if (rd > w || w - rd > r->cap) {
        PyErr_SetString(PyExc_ValueError, "ring header is corrupt (read_pos beyond write_pos or capacity)");
        return -1;
    }
    *write_pos = w;
    return r->cap - (w - rd) >= need;
}

/* Publish a record of `size` bytes copied at w: the count first, then write_pos (RELEASE). */
static void ring_commit(const Ring *r, uint64_t w, uint64_t size)
{
    store_relaxed(r, OFF_WRITE_COUNT, load_relaxed(r, OFF_WRITE_COUNT) + 1);
    store_release(r, OFF_WRITE_POS, w + size);
}

/* --- packing an event ----------------------------------------------------------------------------- */

/* The record being packed: on the stack for a typical event, on the heap up to MAX_RECORD. */
#define PACK_STACK 2048

typedef struct {
    unsigned char *p;
    size_t len, cap;
    int too_big, no_memory;
    unsigned char stack[PACK_STACK];
} Pack;

static int pack_grow(Pack *k, size_t n)
{
    size_t want = k->len + n;
    if (want > MAX_RECORD) {
        k->too_big = 1;
        return 0;
    }
    size_t cap = 2 * k->cap < MAX_RECORD ? 2 * k->cap : MAX_RECORD;
    if (cap < want)
        cap = want;
    unsigned char *p = k->p == k->stack ? PyMem_Malloc(cap) : PyMem_Realloc(k->p, cap);
    if (p == NULL) {
        k->no_memory = 1;
        return 0;
    }
    if (k->p == k->stack)
        memcpy(p, k->stack, k->len);
    k->p = p, k->cap = cap;
    return 1;
}

/* Room for n more bytes at k->p + k->len (the caller writes them and advances k->len); NULL: too big. */
static inline unsigned char *reserve(Pack *k, size_t n)
{
    if (__builtin_expect(k->len + n > k->cap, 0) && !pack_grow(k, n))
        return NULL;
    return k->p + k->len;
}

/* An exact str's UTF-8 (a compact ASCII str's is its data); NULL, error cleared, for anything else
 * or text UTF-8 cannot encode (lone surrogates). */
static inline const char *utf8_of(PyObject *s, Py_ssize_t *n)
{
    if (!PyUnicode_CheckExact(s))
        return NULL;
    if (PyUnicode_IS_COMPACT_ASCII(s)) {
        *n = PyUnicode_GET_LENGTH(s);
        return (const char *)PyUnicode_1BYTE_DATA(s);
    }
    const char *p = PyUnicode_AsUTF8AndSize(s, n);
    if (p == NULL)
        PyErr_Clear();
    return p;
}

/* u32 length | UTF-8 of an exact str, with `extra` more bytes reserved after it; 0 when not packable. */
static inline int put_str_then(Pack *k, PyObject *s, size_t extra)
{
    Py_ssize_t n;
    const char *p = utf8_of(s, &n);
    if (p == NULL)
        return 0;
    if (n > MAX_RECORD) {
        k->too_big = 1;
        return 0;
    }
    unsigned char *w = reserve(k, 4 + (size_t)n + extra);
    if (w == NULL)
        return 0;
    uint32_t len = (uint32_t)n;
    memcpy(w, &len, 4);
    memcpy(w + 4, p, (size_t)n);
    k->len += 4 + (size_t)n;
    return 1;
}

static inline int put_str(Pack *k, PyObject *s)
{
    return put_str_then(k, s, 0);
}

static inline int put_raw(Pack *k, const void *s, size_t n)
{
    unsigned char *w = reserve(k, n);
    if (w == NULL)
        return 0;
    memcpy(w, s, n);
    k->len += n;
    return 1;
}

/* Days from 0001-01-01 style civil dates to 1970-01-01 (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

/* chain.micros: an exact datetime, naive (taken as UTC) or on timezone.utc; 0 for anything else. */
static int micros_of(PyObject *ts, int64_t *out)
{
    if (!PyDateTime_CheckExact(ts))
        return 0;
    PyObject *tz = PyDateTime_DATE_GET_TZINFO(ts);
    if (tz != Py_None && tz != PyDateTime_TimeZone_UTC)
        return 0;
    int64_t days = days_from_civil(PyDateTime_GET_YEAR(ts), (unsigned)PyDateTime_GET_MONTH(ts),
                                   (unsigned)PyDateTime_GET_DAY(ts));
    int64_t secs = days * 86400 + PyDateTime_DATE_GET_HOUR(ts) * 3600 + PyDateTime_DATE_GET_MINUTE(ts) * 60
                   + PyDateTime_DATE_GET_SECOND(ts);
    *out = secs * 1000000 + PyDateTime_DATE_GET_MICROSECOND(ts);
    return 1;
}

/* A uuid.UUID's 128-bit .int, little-endian; 0 (error cleared) when it is not a 16-byte unsigned int. */
static int uuid_bytes(PyObject *u, unsigned char out[16])
{
    PyObject *v = PyObject_GetAttr(u, str_int);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = PyLong_CheckExact(v);
#if PY_VERSION_HEX >= 0x030D0000
    ok = ok && _PyLong_AsByteArray((PyLongObject *)v, out, 16, 1, 0, 1) == 0;
#else
    ok = ok && _PyLong_AsByteArray((PyLongObject *)v, out, 16, 1, 0) == 0;
#endif
    Py_DECREF(v);
    if (!ok)
        PyErr_Clear();
    return ok;
}

/* One detail value (9 bytes are reserved): tag and bytes; 0 when it is not exactly None, bool, int64,
 * float or str. */
static inline int put_value(Pack *k, PyObject *v)
{
    PyTypeObject *t = Py_TYPE(v);
    unsigned char *w = k->p + k->len;
    if (t == &PyUnicode_Type) {
        *w = 'S';
        k->len++;
        return put_str(k, v);
    }
    if (t == &PyLong_Type) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (x == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        int64_t i = (int64_t)x;
        *w = 'I';
        memcpy(w + 1, &i, 8);
        k->len += 9;
        return 1;
    }
    if (t == &PyFloat_Type) {
        double x = PyFloat_AS_DOUBLE(v);
        *w = 'D';
        memcpy(w + 1, &x, 8);
        k->len += 9;
        return 1;
    }
    if (v == Py_None)
        *w = 'N';
    else if (v == Py_True)
        *w = 'T';
    else if (v == Py_False)
        *w = 'F';
    else
        return 0;
    k->len++;
    return 1;
}

static int put_details(Pack *k, PyObject *d)
{
    if (!PyDict_CheckExact(d) || PyDict_GET_SIZE(d) > MAX_DETAILS)
        return 0;
    Py_ssize_t size = PyDict_GET_SIZE(d), pos = 0, n = 0;
    uint32_t count = (uint32_t)size;
    PyObject *key, *value;
    if (!put_raw(k, &count, 4))
        return 0;
    while (PyDict_Next(d, &pos, &key, &value)) {
        if (!put_str_then(k, key, 9) || !put_value(k, value))
            return 0;
        n++;
    }
    return n == size;
}

/* The whole 'E' record into k (u32 n filled in last): 1, or 0 when the event cannot be packed exactly. */
static int pack_event(Pack *k, PyObject *const *a)
{
    int64_t micros;
    unsigned char subject[16], flags = 0;
    PyObject *s = a[A_SUBJECT];
    if (!micros_of(a[A_TS], &micros))
        return 0;
    if (s == Py_None)
        flags |= SUBJECT_NONE;
    else if (Py_TYPE(s) == uuid_type) {
        if (!uuid_bytes(s, subject))
            return 0;
        flags |= SUBJECT_UUID;
    }
    else if (PyUnicode_CheckExact(s))
        flags |= SUBJECT_STR;
    else
        return 0;
    for (int i = A_OBJECT; i <= A_REQUEST; i++) {
        if (a[i] != Py_None && !PyUnicode_CheckExact(a[i]))
            return 0;
    }
    if (a[A_DETAILS] != Py_None && !PyDict_CheckExact(a[A_DETAILS]))
        return 0;
    flags |= (a[A_OBJECT] != Py_None ? HAS_OBJECT : 0) | (a[A_REQUEST] != Py_None ? HAS_REQUEST : 0)
             | (a[A_DETAILS] != Py_None ? HAS_DETAILS : 0);

    unsigned char head[14]; /* u32 n (later) | 'E' | i64 micros | flags */
    head[4] = 'E';
    memcpy(head + 5, &micros, 8);
    head[13] = flags;
    if (!put_raw(k, head, sizeof(head)) || !put_str(k, a[A_ACTION]) || !put_str(k, a[A_ACTOR])
        || !put_str(k, a[A_OUTCOME]))
        return 0;
    if ((flags & SUBJECT_MASK) == SUBJECT_UUID && !put_raw(k, subject, 16))
        return 0;
    if ((flags & SUBJECT_MASK) == SUBJECT_STR && !put_str(k, s))
        return 0;
    if ((flags & HAS_OBJECT) && !put_str(k, a[A_OBJECT]))
        return 0;
    if ((flags & HAS_REQUEST) && !put_str(k, a[A_REQUEST]))
        return 0;
    if ((flags & HAS_DETAILS) && !put_details(k, a[A_DETAILS]))
        return 0;
    uint32_t n = (uint32_t)(k->len - 4);
    memcpy(k->p, &n, 4);
    return 1;
}

/* --- decoding records ----------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *p, *end;
    const char *why; /* what was malformed (no Python error set) */
} Cursor;

static inline int take_bytes(Cursor *c, void *out, size_t n)
{
    if ((size_t)(c->end - c->p) < n) {
        c->why = "truncated payload";
        return 0;
    }
    memcpy(out, c->p, n);
    c->p += n;
    return 1;
}

/* Short strings recur from event to event (actions, actors, outcomes, detail keys, a camera's ids):
 * take returns the same str object for the same bytes, which saves decoding them, lets dicts reuse their
 * cached hash, and lets the record formatter's identity shortcuts (_fastchain) hit. A direct-mapped
 * table on the consumer side (calls hold the GIL); a miss just replaces the slot's entry. */
#define INTERN_SLOTS 1024 /* a power of two */
#define INTERN_MAX 64     /* an API key actor is 43 bytes; request ids, unique, are never interned */

static struct {
    uint32_t n;
    unsigned char b[INTERN_MAX];
    PyObject *s;
} interned[INTERN_SLOTS];

/* A u32-length str; NULL with c->why set (malformed) or a Python error (invalid UTF-8, memory).
 * `shared`: look the text up in (and add it to) the table of recurring strings. */
static PyObject *get_str_as(Cursor *c, int shared)
{
    uint32_t n;
    if (!take_bytes(c, &n, 4))
        return NULL;
    if ((size_t)(c->end - c->p) < n) {
        c->why = "string beyond the record's end";
        return NULL;
    }
    size_t slot = INTERN_SLOTS;
    if (shared && n <= INTERN_MAX) {
        uint32_t h = 2166136261u ^ n; /* FNV-1a */
        for (uint32_t i = 0; i < n; i++)
            h = (h ^ c->p[i]) * 16777619u;
        slot = h & (INTERN_SLOTS - 1);
        if (interned[slot].s != NULL && interned[slot].n == n && memcmp(interned[slot].b, c->p, n) == 0) {
            c->p += n;
            return Py_NewRef(interned[slot].s);
        }
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)c->p, (Py_ssize_t)n, NULL);
    if (s != NULL && slot < INTERN_SLOTS) {
        Py_XSETREF(interned[slot].s, Py_NewRef(s));
        interned[slot].n = n;
        memcpy(interned[slot].b, c->p, n);
    }
    c->p += n;
    return s;
}

static inline PyObject *get_str(Cursor *c)
{
    return get_str_as(c, 1);
}

static PyObject *get_details(Cursor *c)
{
    uint32_t n;
    if (!take_bytes(c, &n, 4))
        return NULL;
    if (n > MAX_DETAILS) {
        c->why = "too many details";
        return NULL;
    }
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *key = get_str(c), *value = NULL;
        unsigned char tag;
        if (key == NULL || !take_bytes(c, &tag, 1))
            goto fail;
        switch (tag) {
        case 'N': value = Py_NewRef(Py_None); break;
        case 'T': value = Py_NewRef(Py_True); break;
        case 'F': value = Py_NewRef(Py_False); break;
        case 'I': {
            int64_t x;
            if (take_bytes(c, &x, 8))
                value = PyLong_FromLongLong((long long)x);
            break;
        }
        case 'D': {
            double x;
            if (take_bytes(c, &x, 8))
                value = PyFloat_FromDouble(x);
            break;
        }
        case 'S': value = get_str(c); break;
        default: c->why = "unknown detail value tag";
        }
        if (value == NULL || PyDict_SetItem(d, key, value) < 0) {
            Py_XDECREF(value);
            goto fail;
        }
        Py_DECREF(key);
        Py_DECREF(value);
        continue;
    fail:
        Py_XDECREF(key);
        Py_DECREF(d);
        return NULL;
    }
    if (PyDict_GET_SIZE(d) != (Py_ssize_t)n) {
        c->why = "duplicate detail key";
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

/* An 'E' payload as event_tuple's 8-tuple. */
static PyObject *get_event(Cursor *c)
{
    int64_t micros;
    unsigned char flags;
    if (!take_bytes(c, &micros, 8) || !take_bytes(c, &flags, 1))
        return NULL;
    if ((flags & ~FLAGS_KNOWN) != 0 || (flags & SUBJECT_MASK) == SUBJECT_MASK) {
        c->why = "unknown event flags";
        return NULL;
    }
    PyObject *t = PyTuple_New(8);
    if (t == NULL)
        return NULL;
    PyObject *v = PyLong_FromLongLong((long long)micros);
    if (v == NULL)
        goto fail;
    PyTuple_SET_ITEM(t, 0, v);
    for (int i = 1; i <= 3; i++) {
        if ((v = get_str(c)) == NULL)
            goto fail;
        PyTuple_SET_ITEM(t, i, v);
    }
    switch (flags & SUBJECT_MASK) {
    case SUBJECT_UUID: {
        unsigned char b[16];
        v = take_bytes(c, b, 16) ? _PyLong_FromByteArray(b, 16, 1, 0) : NULL;
        break;
    }
    case SUBJECT_STR: v = get_str(c); break;
    default: v = Py_NewRef(Py_None);
    }
    if (v == NULL)
        goto fail;
    PyTuple_SET_ITEM(t, 4, v);
    v = flags & HAS_OBJECT ? get_str(c) : Py_NewRef(Py_None);
    if (v == NULL)
        goto fail;
    PyTuple_SET_ITEM(t, 5, v);
    v = flags & HAS_REQUEST ? get_str_as(c, 0) : Py_NewRef(Py_None);
    if (v == NULL)
        goto fail;
    PyTuple_SET_ITEM(t, 6, v);
    v = flags & HAS_DETAILS ? get_details(c) : Py_NewRef(Py_None);
    if (v == NULL)
        goto fail;
    PyTuple_SET_ITEM(t, 7, v);
    if (c->p != c->end) {
        c->why = "trailing bytes after the event";
        goto fail;
    }
    return t;
fail:
    Py_DECREF(t);
    return NULL;
}

/* One record's item from its kind and payload; NULL with c->why or a Python error set. */
static PyObject *get_item(Cursor *c, unsigned char kind)
{
    switch (kind) {
    case 'E': return get_event(c);
    case 'P': return PyBytes_FromStringAndSize((const char *)c->p, c->end - c->p);
    case 'F': {
        uint64_t id;
        if (c->end - c->p != 8) {
            c->why = "flush marker payload is not 8 bytes";
            return NULL;
        }
        memcpy(&id, c->p, 8);
        return PyLong_FromUnsignedLongLong(id);
    }
    default: c->why = "unknown record kind"; return NULL;
    }
}

/* --- arguments ------------------------------------------------------------------------------------ */

static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
    return -1;
}

/* A u64 argument; TypeError for a non-int, ValueError for one out of range. */
static int u64_arg(PyObject *v, const char *name, uint64_t *out)
{
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", name);
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be in [0, 2**64)", name);
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

/* --- functions ------------------------------------------------------------------------------------ */

PyDoc_STRVAR(init_doc,
"init(buf) -> None\n\n"
"Make buf (writable, >= 192 + 4096 bytes, 8-byte aligned) an empty ring: header zeroed, magic and\n"
"capacity = len(buf) - 192 written.");

static PyObject *ring_init(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Ring r;
    if (check_nargs("init", nargs, 1) < 0 || ring_open(args[0], &r, 0) < 0)
        return NULL;
    memset(r.base, 0, HEADER);
    memcpy(r.base + OFF_MAGIC, MAGIC, sizeof(MAGIC));
    store_release(&r, OFF_CAPACITY, r.cap);
    ring_close(&r);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(put_event_doc,
"put_event(buf, event) -> int\n\n"
"Pack an AuditEvent as an 'E' record: 1 written; 0 no room (nothing written); -1 the event cannot be\n"
"packed exactly (a value of another type, an int beyond int64, another time zone, unencodable text, a\n"
"record over MAX_RECORD or the ring's capacity): nothing written, no exception; pickle it instead.");

static PyObject *put_event(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Ring r;
    if (check_nargs("put_event", nargs, 2) < 0 || ring_open(args[0], &r, 1) < 0)
        return NULL;
    PyObject *a[N_ATTRS];
    int got = 0, done = -1, error = 0;
    for (; got < N_ATTRS; got++) {
        if ((a[got] = PyObject_GetAttr(args[1], attr_names[got])) == NULL) {
            PyErr_Clear();
            break;
        }
    }
    Pack k;
    k.p = k.stack, k.len = 0, k.cap = PACK_STACK, k.too_big = 0, k.no_memory = 0;
    if (got == N_ATTRS && pack_event(&k, a)) {
        uint64_t w;
        int room = k.len > r.cap ? -2 : ring_room(&r, k.len, &w);
        if (room == 1) {
            ring_put(&r, w, k.p, k.len);
            ring_commit(&r, w, k.len);
        }
        done = room == -2 ? -1 : room;
        error = room == -1;
    }
    else if (k.no_memory) {
        PyErr_NoMemory();
        error = 1;
    }
    for (int i = 0; i < got; i++)
        Py_DECREF(a[i]);
    if (k.p != k.stack)
        PyMem_Free(k.p);
    ring_close(&r);
    return error ? NULL : PyLong_FromLong(done);
}

/* Write kind | payload as one record: 1 written, 0 no room, -1 raised (never fits, corrupt header). */
static int put_record(Ring *r, unsigned char kind, const void *payload, size_t len)
{
    if (len > MAX_RECORD - 5 || 5 + len > r->cap) {
        PyErr_Format(PyExc_ValueError, "a record of %zu bytes can never fit (MAX_RECORD %d, capacity %llu)", 5 + len,
                     MAX_RECORD, (unsigned long long)r->cap);
        return -1;
    }
    uint64_t w;
    int room = ring_room(r, 5 + len, &w);
    if (room != 1)
        return room;
    unsigned char head[5];
    uint32_t n = (uint32_t)(1 + len);
    memcpy(head, &n, 4);
    head[4] = kind;
    ring_put(r, w, head, 5);
    ring_put(r, w + 5, payload, len);
    ring_commit(r, w, 5 + len);
    return 1;
}

static PyObject *bool_or_null(int v)
{
    if (v < 0)
        return NULL;
    return Py_NewRef(v ? Py_True : Py_False);
}

PyDoc_STRVAR(put_pickled_doc,
"put_pickled(buf, data: bytes) -> bool\n\n"
"Write data as a 'P' record; False when there is no room. ValueError if it could never fit.");

static PyObject *put_pickled(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Ring r;
    if (check_nargs("put_pickled", nargs, 2) < 0)
        return NULL;
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "put_pickled: data must be bytes");
        return NULL;
    }
    if (ring_open(args[0], &r, 1) < 0)
        return NULL;
    int done = put_record(&r, 'P', PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1]));
    ring_close(&r);
    return bool_or_null(done);
}

PyDoc_STRVAR(put_marker_doc,
"put_marker(buf, marker_id: int) -> bool\n\n"
"Write a flush marker ('F', a u64 id); False when there is no room. ValueError for an id outside u64.");

static PyObject *put_marker(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Ring r;
    uint64_t id;
    if (check_nargs("put_marker", nargs, 2) < 0 || u64_arg(args[1], "marker_id", &id) < 0
        || ring_open(args[0], &r, 1) < 0)
        return NULL;
    int done = put_record(&r, 'F', &id, 8);
    ring_close(&r);
    return bool_or_null(done);
}

PyDoc_STRVAR(take_doc,
"take(buf, pos: int, limit: int) -> tuple[list, int]\n\n"
"Decode at most limit records from stream position pos (read_pos <= pos <= write_pos) up to the\n"
"write_pos seen at the start: event tuples (as chain.event_tuple), bytes ('P'), ints (markers); and\n"
"the position after the last. ValueError, naming the position, for a malformed record.");

static PyObject *take(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Ring r;
    uint64_t pos;
    if (check_nargs("take", nargs, 3) < 0 || u64_arg(args[1], "pos", &pos) < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "take: limit must be >= 0");
        return NULL;
    }
    if (ring_open(args[0], &r, 1) < 0)
        return NULL;
    uint64_t w = load_acquire(&r, OFF_WRITE_POS), rd = load_acquire(&r, OFF_READ_POS);
    PyObject *items = NULL, *result = NULL, *end = NULL;
    unsigned char *scratch = NULL; /* a record that wraps, made contiguous */
    if (rd > w || w - rd > r.cap) {
        PyErr_SetString(PyExc_ValueError, "ring header is corrupt (read_pos beyond write_pos or capacity)");
        goto done;
    }
    if (pos < rd || pos > w) {
        PyErr_Format(PyExc_ValueError, "take: pos %llu is outside [read_pos %llu, write_pos %llu]",
                     (unsigned long long)pos, (unsigned long long)rd, (unsigned long long)w);
        goto done;
    }
    if ((items = PyList_New(0)) == NULL)
        goto done;
    for (Py_ssize_t count = 0; count < limit && pos < w; count++) {
        Cursor c = {NULL, NULL, NULL};
        uint32_t n = 0;
        PyObject *item = NULL;
        if (w - pos < 5)
            c.why = "truncated record header";
        else {
            ring_get(&r, pos, &n, 4);
            if (n < 1 || n > MAX_RECORD - 4 || n > w - pos - 4)
                c.why = "record length beyond write_pos or MAX_RECORD";
        }
        if (c.why == NULL) {
            size_t at = (size_t)((pos + 4) % r.cap);
            if (n <= r.cap - at)
                c.p = r.data + at;
            else {
                if (scratch == NULL && (scratch = PyMem_Malloc(MAX_RECORD)) == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                ring_get(&r, pos + 4, scratch, n);
                c.p = scratch;
            }
            c.end = c.p + n;
            unsigned char kind = *c.p++;
            item = get_item(&c, kind);
        }
        if (item == NULL) {
            if (c.why == NULL && !PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                goto done; /* memory */
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "malformed ring record at stream position %llu: %s",
                         (unsigned long long)pos, c.why != NULL ? c.why : "invalid UTF-8");
            goto done;
        }
        int failed = PyList_Append(items, item);
        Py_DECREF(item);
        if (failed < 0)
            goto done;
        pos += 4 + (uint64_t)n;
    }
    if ((end = PyLong_FromUnsignedLongLong(pos)) != NULL)
        result = PyTuple_Pack(2, items, end);
done:
    Py_XDECREF(end);
    Py_XDECREF(items);
    PyMem_Free(scratch);
    ring_close(&r);
    return result;
}

PyDoc_STRVAR(release_doc,
"release(buf, pos: int, count: int) -> None\n\n"
"The consumer is done with the stream up to pos (count more records): read_count += count, then\n"
"read_pos = pos (RELEASE). ValueError unless read_pos <= pos <= write_pos and count >= 0.");

static PyObject *release(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Ring r;
    uint64_t pos;
    if (check_nargs("release", nargs, 3) < 0 || u64_arg(args[1], "pos", &pos) < 0)
        return NULL;
    long long count = PyLong_AsLongLong(args[2]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    if (count < 0) {
        PyErr_SetString(PyExc_ValueError, "release: count must be >= 0");
        return NULL;
    }
    if (ring_open(args[0], &r, 1) < 0)
        return NULL;
    uint64_t w = load_acquire(&r, OFF_WRITE_POS), rd = load_relaxed(&r, OFF_READ_POS);
    if (pos < rd || pos > w) {
        PyErr_Format(PyExc_ValueError, "release: pos %llu is outside [read_pos %llu, write_pos %llu]",
                     (unsigned long long)pos, (unsigned long long)rd, (unsigned long long)w);
        ring_close(&r);
        return NULL;
    }
    store_relaxed(&r, OFF_READ_COUNT, load_relaxed(&r, OFF_READ_COUNT) + (uint64_t)count);
    store_release(&r, OFF_READ_POS, pos);
    ring_close(&r);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(state_doc,
"state(buf) -> tuple[int, int, int, int, int]\n\n"
"(write_pos, write_count, read_pos, read_count, capacity), each loaded with ACQUIRE.");

static PyObject *state(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Ring r;
    if (check_nargs("state", nargs, 1) < 0 || ring_open(args[0], &r, 1) < 0)
        return NULL;
    unsigned long long w = load_acquire(&r, OFF_WRITE_POS), wc = load_acquire(&r, OFF_WRITE_COUNT);
    unsigned long long rd = load_acquire(&r, OFF_READ_POS), rc = load_acquire(&r, OFF_READ_COUNT);
    ring_close(&r);
    return Py_BuildValue("(KKKKK)", w, wc, rd, rc, (unsigned long long)r.cap);
}

static PyMethodDef methods[] = {
    {"init", (PyCFunction)(void (*)(void))ring_init, METH_FASTCALL, init_doc},
    {"put_event", (PyCFunction)(void (*)(void))put_event, METH_FASTCALL, put_event_doc},
    {"put_pickled", (PyCFunction)(void (*)(void))put_pickled, METH_FASTCALL, put_pickled_doc},
    {"put_marker", (PyCFunction)(void (*)(void))put_marker, METH_FASTCALL, put_marker_doc},
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL, take_doc},
    {"release", (PyCFunction)(void (*)(void))release, METH_FASTCALL, release_doc},
    {"state", (PyCFunction)(void (*)(void))state, METH_FASTCALL, state_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "appliance.audit._ring",
    .m_doc = "The shared-memory ring between the API process and its audit writer (appliance.audit.ring).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__ring(void)
{
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL)
        return NULL;
    for (int i = 0; i < N_ATTRS; i++) {
        if (attr_names[i] == NULL && (attr_names[i] = PyUnicode_InternFromString(ATTR_NAMES[i])) == NULL)
            return NULL;
    }
    if (str_int == NULL && (str_int = PyUnicode_InternFromString("int")) == NULL)
        return NULL;
    if (uuid_type == NULL) {
        PyObject *uuid = PyImport_ImportModule("uuid");
        PyObject *cls = uuid == NULL ? NULL : PyObject_GetAttrString(uuid, "UUID");
        Py_XDECREF(uuid);
        if (cls == NULL)
            return NULL;
        if (!PyType_Check(cls)) {
            Py_DECREF(cls);
            PyErr_SetString(PyExc_TypeError, "uuid.UUID is not a type");
            return NULL;
        }
        uuid_type = (PyTypeObject *)cls; /* held for the life of the process */
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "HEADER", HEADER) < 0 || PyModule_AddIntConstant(m, "MAX_RECORD", MAX_RECORD) < 0
        || PyModule_AddIntConstant(m, "MIN_CAPACITY", MIN_CAPACITY) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
