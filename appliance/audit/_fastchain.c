/* The compiled match loop of appliance.audit.chain.format_copy_batch.
 *
 * Why: a camera appliance writes tens of thousands of match events per second and the Python loop
 * (chain._format_one, the reference) costs ~17 us each, mostly string formatting and two hashes.
 *
 * What: match_run walks a batch of event tuples and, for each match-class event whose every field the
 * Python path has already checked and cached (actor, action, outcome, subject, detail keys and short
 * detail strings, the timestamp's whole second), writes exactly the bytes _format_one would: the
 * record's body and header, their SHA-256, the block element, the new chain head. It makes no decision
 * of its own: at the first event it cannot format exactly as Python would (another class, an uncached
 * or oversized value, anything unusual) it stops and returns that event's index, and the caller formats
 * it in Python, which fills the caches, then calls again. It only reads the caches. Strings that JSON
 * escapes go through the encoders Python uses (encode_basestring, the flat details encoder); the rest
 * is quoted UTF-8 as it stands. tests/audit/test_fastchain.py compares the bytes with the Python path.
 *
 * Within one run, the last key looked up in each cache is remembered (and held, so its address cannot
 * be reused): the next event carrying the very same object skips the lookup. Every cached value is a
 * function of its key, so this changes nothing but the time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* SHA256_Init/Update/Final are deprecated in OpenSSL 3, but its one-shot SHA256() fetches the EVP
 * method on every call (~4x slower on these ~300-byte inputs); the low-level calls use SHA-NI. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

#define MAX_REQUEST_ID 100 /* _format_one's bounds: Python cuts longer values */
#define MAX_STRING 1024
#define MAX_DETAIL_KEYS 16 /* more: _details_json sanitises */

/* setup()'s caches and encoders: value -> (bounded text, JSON, needs COPY escaping) for actions,
 * actors and outcomes; subject -> (text, JSON, digest JSON); second -> "YYYY-MM-DDTHH:MM:SS";
 * detail key -> harmless?; short detail string -> harmless? */
enum { ACTIONS, ACTORS, OUTCOMES, SUBJECTS, SECONDS, KEY_OK, SAFE_TEXT, ENCODE_FLAT, ENCODE_BASESTRING, N_SETUP };
static PyObject *setup_refs[N_SETUP];

/* --- text pieces and a growable output buffer --------------------------------------------------- */

typedef struct {
    const char *p;
    Py_ssize_t n;
    int quote; /* write as "p": a str that JSON leaves as it is */
} Text;

static const Text NULL_TEXT = {"null", 4, 0};

typedef struct {
    char *p;
    Py_ssize_t len, cap;
    int failed; /* sticky: checked once after a run of puts */
} Buf;

static void grow_put(Buf *b, const char *s, Py_ssize_t n)
{
    Py_ssize_t cap = 2 * b->cap > b->len + n ? 2 * b->cap : b->len + n;
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        b->failed = 1;
        return;
    }
    b->p = p, b->cap = cap;
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
}

static inline void put(Buf *b, const char *s, Py_ssize_t n)
{
    if (b->len + n > b->cap) {
        grow_put(b, s, n);
        return;
    }
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
}

#define PUT_LIT(b, lit) put(b, lit, (Py_ssize_t)sizeof(lit) - 1)

static inline void put_text(Buf *b, const Text *t)
{
    if (t->quote)
        PUT_LIT(b, "\"");
    put(b, t->p, t->n);
    if (t->quote)
        PUT_LIT(b, "\"");
}

static void put_int(Buf *b, long long v)
{
    char tmp[24];
    int i = sizeof(tmp);
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[--i] = '-';
    put(b, tmp + i, (Py_ssize_t)sizeof(tmp) - i);
}

static void sha256(const char *p, Py_ssize_t n, unsigned char out[32])
{
    SHA256_CTX c;
    SHA256_Init(&c);
    SHA256_Update(&c, p, (size_t)n);
    SHA256_Final(out, &c);
}

static char hex_pairs[256][2]; /* byte -> its two lowercase hex digits, filled at import */

static void to_hex(const unsigned char d[32], char out[64])
{
    for (int i = 0; i < 32; i++)
        memcpy(out + 2 * i, hex_pairs[d[i]], 2);
}

/* --- reading Python values ---------------------------------------------------------------------- */

/* An exact str's UTF-8 (CPython keeps it on the str); 0, error cleared, for anything else or a str
 * UTF-8 cannot encode (lone surrogates: Python's path raises its own error on those). */
static int utf8_of(PyObject *s, Text *t)
{
    if (!PyUnicode_CheckExact(s))
        return 0;
    t->p = PyUnicode_AsUTF8AndSize(s, &t->n);
    t->quote = 0;
    if (t->p == NULL) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static unsigned char json_escaped[256]; /* control characters, quote, backslash: filled at import */

/* Would encode_basestring escape anything in this UTF-8 (a control character, quote or backslash)?
 * The bytes of multi-byte sequences are all >= 0x80, so a byte scan is exact. */
static int json_escapes(const Text *t)
{
    const unsigned char *p = (const unsigned char *)t->p;
    unsigned char any = 0;
    for (Py_ssize_t i = 0; i < t->n; i++)
        any |= json_escaped[p[i]];
    return any;
}

/* A Python encoder's str result as UTF-8, kept alive by *hold. */
static int encoded(PyObject *result, PyObject **hold, Text *t)
{
    if (result == NULL) {
        PyErr_Clear();
        return 0;
    }
    *hold = result;
    return utf8_of(result, t);
}

/* The last key looked up in one cache and its value (a tuple), both held. */
typedef struct {
    PyObject *key, *value;
} Memo;

/* cache[key], a tuple of at least `size` items (borrowed, held by the memo); NULL when not cached. */
static PyObject *memo_get(Memo *m, PyObject *cache, PyObject *key, Py_ssize_t size)
{
    if (key == m->key)
        return m->value;
    PyObject *v = PyDict_GetItemWithError(cache, key);
    if (v == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyTuple_CheckExact(v) || PyTuple_GET_SIZE(v) < size)
        return NULL;
    Py_INCREF(key);
    Py_INCREF(v);
    Py_XSETREF(m->key, key);
    Py_XSETREF(m->value, v);
    return v;
}

static void memo_clear(Memo *m)
{
    Py_CLEAR(m->key);
    Py_CLEAR(m->value);
}

/* request_id / object_id: None, or a str _format_one keeps as it is (short enough, no NUL), as JSON. */
static int optional_json(PyObject *v, Py_ssize_t limit, PyObject **hold, Text *t)
{
    if (v == Py_None) {
        *t = NULL_TEXT;
        return 1;
    }
    if (!utf8_of(v, t) || PyUnicode_GET_LENGTH(v) > limit) /* (utf8_of readies a legacy str first) */
        return 0;
    if (memchr(t->p, 0, (size_t)t->n) != NULL)
        return 0;
    if (json_escapes(t))
        return encoded(PyObject_CallOneArg(setup_refs[ENCODE_BASESTRING], v), hold, t);
    t->quote = 1;
    return 1;
}

/* --- details ------------------------------------------------------------------------------------ */

/* The last detail key set seen (keys held, in the dict's order), checked harmless, and its sort order. */
typedef struct {
    PyObject *keys[MAX_DETAIL_KEYS];
    Text text[MAX_DETAIL_KEYS];
    unsigned char order[MAX_DETAIL_KEYS];
    int n, escapes;
} KeySet;

static void keyset_clear(KeySet *ks)
{
    for (int i = 0; i < ks->n; i++)
        Py_CLEAR(ks->keys[i]);
    ks->n = 0;
}

/* Check the keys as _key_ok would (from its cache only) and sort them: UTF-8 byte order is code point
 * order, which is what the encoder's sort_keys sorts by (the keys of one dict are distinct). */
static int keyset_learn(KeySet *ks, PyObject **keys, int n)
{
    Text text[MAX_DETAIL_KEYS];
    int escapes = 0;
    for (int i = 0; i < n; i++) {
        if (!PyUnicode_CheckExact(keys[i]) || PyDict_GetItemWithError(setup_refs[KEY_OK], keys[i]) != Py_True) {
            PyErr_Clear();
            return 0;
        }
        if (!utf8_of(keys[i], &text[i]))
            return 0;
        escapes |= json_escapes(&text[i]);
    }
    keyset_clear(ks);
    for (int i = 0; i < n; i++) {
        Py_INCREF(keys[i]);
        ks->keys[i] = keys[i];
        ks->text[i] = text[i];
        int j = i;
        for (; j > 0; j--) {
            const Text *a = &text[ks->order[j - 1]];
            int c = memcmp(a->p, text[i].p, (size_t)(a->n < text[i].n ? a->n : text[i].n));
            if (c < 0 || (c == 0 && a->n < text[i].n))
                break;
            ks->order[j] = ks->order[j - 1];
        }
        ks->order[j] = (unsigned char)i;
    }
    ks->n = n, ks->escapes = escapes;
    return 1;
}

typedef struct {
    const Text *key;
    PyObject *value; /* borrowed from the details dict (the event tuple is held) */
    Text text;       /* when value is a str */
} Item;

typedef struct {
    Item items[MAX_DETAIL_KEYS]; /* in key order */
    int n;
    Text json; /* instead of items: "{}", or what Python's encoder wrote */
    int have_json;
} Details;

/* _details_json's plain case: every key cached as harmless, every value plain as _plain_values says.
 * Anything else (sanitising, redaction) is Python's: 0. */
static int details_of(KeySet *ks, PyObject *d, Details *out, PyObject **hold)
{
    out->n = 0, out->have_json = 0;
    if (!PyDict_CheckExact(d) || PyDict_GET_SIZE(d) > MAX_DETAIL_KEYS)
        return 0;
    if (PyDict_GET_SIZE(d) == 0) {
        out->json.p = "{}", out->json.n = 2, out->json.quote = 0, out->have_json = 1;
        return 1;
    }
    PyObject *keys[MAX_DETAIL_KEYS], *values[MAX_DETAIL_KEYS], *k, *v;
    Py_ssize_t pos = 0;
    int n = 0, same = 1;
    while (PyDict_Next(d, &pos, &k, &v)) {
        if (n == MAX_DETAIL_KEYS)
            return 0;
        same &= n < ks->n && ks->keys[n] == k;
        keys[n] = k, values[n++] = v;
    }
    if (!(same && n == ks->n) && !keyset_learn(ks, keys, n))
        return 0;
    int reference = ks->escapes; /* something Python's encoder must write: an escape, a huge int */
    for (int i = 0; i < n; i++) {
        Item *it = &out->items[i];
        it->key = &ks->text[ks->order[i]];
        it->value = v = values[ks->order[i]];
        PyTypeObject *t = Py_TYPE(v);
        if (t == &PyUnicode_Type) {
            if (PyDict_GetItemWithError(setup_refs[SAFE_TEXT], v) != Py_True) {
                PyErr_Clear();
                return 0;
            }
            if (!utf8_of(v, &it->text))
                return 0;
            reference |= json_escapes(&it->text);
        }
        else if (t == &PyFloat_Type) {
            double x = PyFloat_AS_DOUBLE(v);
            if (!(-1e15 < x && x < 1e15) || x == 0) /* also false for NaN */
                return 0;
        }
        else if (t == &PyLong_Type) {
            int overflow;
            PyLong_AsLongLongAndOverflow(v, &overflow);
            reference |= overflow != 0;
        }
        else if (t != &PyBool_Type && v != Py_None)
            return 0;
    }
    out->n = n;
    if (reference) {
        PyObject *zero = PyLong_FromLong(0); /* the indent level */
        PyObject *chunks = zero == NULL ? NULL : PyObject_CallFunctionObjArgs(setup_refs[ENCODE_FLAT], d, zero, NULL);
        Py_XDECREF(zero);
        if (chunks == NULL) {
            PyErr_Clear();
            return 0;
        }
        PyObject *empty = PyUnicode_New(0, 0);
        PyObject *json = empty == NULL ? NULL : PyUnicode_Join(empty, chunks);
        Py_XDECREF(empty);
        Py_DECREF(chunks);
        if (!encoded(json, hold, &out->json))
            return 0;
        out->have_json = 1;
    }
    return 1;
}

/* float.__repr__ (what json's encoder writes for a finite float), remembered by bit pattern: detail
 * floats (thresholds, rounded similarities) recur, and the shortest-repr search costs ~200 ns. */
static struct {
    uint64_t bits;
    char text[31];
    unsigned char n;
} float_reprs[1024];

static int put_float(Buf *b, double x)
{
    uint64_t bits;
    memcpy(&bits, &x, sizeof(bits));
    size_t slot = (size_t)((bits * 0x9E3779B97F4A7C15ULL) >> 54);
    if (float_reprs[slot].n == 0 || float_reprs[slot].bits != bits) {
        char *s = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (s == NULL) {
            PyErr_Clear();
            return 0;
        }
        size_t n = strlen(s);
        if (n >= sizeof(float_reprs[slot].text)) { /* cannot happen for a finite double; never guess */
            PyMem_Free(s);
            return 0;
        }
        memcpy(float_reprs[slot].text, s, n);
        PyMem_Free(s);
        float_reprs[slot].bits = bits, float_reprs[slot].n = (unsigned char)n;
    }
    put(b, float_reprs[slot].text, float_reprs[slot].n);
    return 1;
}

/* The flat details encoder's output for checked items: sorted keys, json's reprs, no spaces. */
static int put_details(Buf *b, const Details *d)
{
    if (d->have_json) {
        put_text(b, &d->json);
        return 1;
    }
    PUT_LIT(b, "{");
    for (int i = 0; i < d->n; i++) {
        const Item *it = &d->items[i];
        PyObject *v = it->value;
        if (i)
            PUT_LIT(b, ",");
        PUT_LIT(b, "\"");
        put(b, it->key->p, it->key->n);
        PUT_LIT(b, "\":");
        if (v == Py_None)
            PUT_LIT(b, "null");
        else if (v == Py_True)
            PUT_LIT(b, "true");
        else if (v == Py_False)
            PUT_LIT(b, "false");
        else if (PyUnicode_CheckExact(v)) {
            PUT_LIT(b, "\"");
            put(b, it->text.p, it->text.n);
            PUT_LIT(b, "\"");
        }
        else if (PyLong_CheckExact(v))
            put_int(b, PyLong_AsLongLong(v)); /* fits: checked in details_of */
        else if (!put_float(b, PyFloat_AS_DOUBLE(v)))
            return 0;
    }
    PUT_LIT(b, "}");
    return 1;
}

/* --- the loop ----------------------------------------------------------------------------------- */

typedef struct {
    PyObject *match_actions, *elements, *digests, *times, *subjects;
    Text chain_json, class_json;
    long long seq, last_ts; /* the chain's head, advanced per record */
    char prev_hex[64];
    unsigned char prev[32];
    int moved;
    long long second; /* the last whole second seen and its "YYYY-MM-DDTHH:MM:SS" */
    char prefix[32];
    Py_ssize_t prefix_n;
    Memo action, actor, outcome, subject; /* action: also known to be a match action */
    KeySet keys;
    Buf element, header;
} Run;

/* The cached text of a whole second, looked up once per second. */
static int second_prefix(Run *r, long long second)
{
    if (second == r->second)
        return 1;
    PyObject *key = PyLong_FromLongLong(second);
    PyObject *v = key == NULL ? NULL : PyDict_GetItemWithError(setup_refs[SECONDS], key);
    Py_XDECREF(key);
    Text t;
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (!utf8_of(v, &t) || t.n > (Py_ssize_t)sizeof(r->prefix))
        return 0;
    memcpy(r->prefix, t.p, (size_t)t.n);
    r->prefix_n = t.n, r->second = second;
    return 1;
}

/* A repeating field's JSON: cache[key][1]. */
static int field_json(Memo *m, PyObject *cache, PyObject *key, Text *t)
{
    PyObject *v = memo_get(m, cache, key, 2);
    return v != NULL && utf8_of(PyTuple_GET_ITEM(v, 1), t);
}

enum { HOLD_OBJECT, HOLD_REQUEST, HOLD_DETAILS, N_HOLD };

/* Format one event as _format_one would: 1 done, 0 Python's to do (nothing written), -1 an error
 * raised while appending the outputs (as Python's would be). */
static int format_match(Run *r, PyObject *ev, PyObject **hold)
{
    /* ts, action, actor, outcome, subject, object_id, request_id, details */
    PyObject *ts_obj = PyTuple_GET_ITEM(ev, 0), *action = PyTuple_GET_ITEM(ev, 1);
    PyObject *subject = PyTuple_GET_ITEM(ev, 4), *subj_text = Py_None;
    Text act, actor, outcome, subj_json = NULL_TEXT, subj_digest = NULL_TEXT, object_json, request_json, ts_text;
    Details details;

    if (action != r->action.key) {
        int is_match = PySet_Contains(r->match_actions, action);
        if (is_match <= 0) {
            PyErr_Clear();
            return 0;
        }
    }
    if (!field_json(&r->action, setup_refs[ACTIONS], action, &act)
        || !field_json(&r->actor, setup_refs[ACTORS], PyTuple_GET_ITEM(ev, 2), &actor)
        || !field_json(&r->outcome, setup_refs[OUTCOMES], PyTuple_GET_ITEM(ev, 3), &outcome))
        return 0;
    if (subject != Py_None) {
        PyObject *v = memo_get(&r->subject, setup_refs[SUBJECTS], subject, 3);
        if (v == NULL || !PyUnicode_CheckExact(PyTuple_GET_ITEM(v, 0)) || !utf8_of(PyTuple_GET_ITEM(v, 1), &subj_json)
            || !utf8_of(PyTuple_GET_ITEM(v, 2), &subj_digest))
            return 0;
        subj_text = PyTuple_GET_ITEM(v, 0);
    }
    if (!optional_json(PyTuple_GET_ITEM(ev, 6), MAX_REQUEST_ID, &hold[HOLD_REQUEST], &request_json)
        || !optional_json(PyTuple_GET_ITEM(ev, 5), MAX_STRING, &hold[HOLD_OBJECT], &object_json)
        || !details_of(&r->keys, PyTuple_GET_ITEM(ev, 7), &details, &hold[HOLD_DETAILS]))
        return 0;

    /* ts: us since the epoch, never before the chain's last; "<second>.<us>+00:00" */
    int overflow = 0;
    long long ts = PyLong_CheckExact(ts_obj) ? PyLong_AsLongLongAndOverflow(ts_obj, &overflow) : -1;
    if (!PyLong_CheckExact(ts_obj) || overflow || ts < 0)
        return 0;
    if (ts < r->last_ts)
        ts = r->last_ts;
    if (!second_prefix(r, ts / 1000000))
        return 0;
    char ts_buf[sizeof(r->prefix) + 16];
    long micro = (long)(ts % 1000000);
    memcpy(ts_buf, r->prefix, (size_t)r->prefix_n);
    char *p = ts_buf + r->prefix_n;
    *p++ = '.';
    for (int i = 5; i >= 0; i--, micro /= 10)
        p[i] = (char)('0' + micro % 10);
    memcpy(p + 6, "+00:00", 6);
    ts_text.p = ts_buf, ts_text.n = r->prefix_n + 13, ts_text.quote = 1;

    /* element = ["ts",action,outcome,body], body the record's canonical body */
    Buf *e = &r->element, *h = &r->header;
    e->len = 0, h->len = 0;
    PUT_LIT(e, "[");
    put_text(e, &ts_text);
    PUT_LIT(e, ",");
    put_text(e, &act);
    PUT_LIT(e, ",");
    put_text(e, &outcome);
    PUT_LIT(e, ",");
    Py_ssize_t body_start = e->len;
    PUT_LIT(e, "{\"actor\":");
    put_text(e, &actor);
    PUT_LIT(e, ",\"details\":");
    if (!put_details(e, &details))
        return 0;
    PUT_LIT(e, ",\"object_id\":");
    put_text(e, &object_json);
    PUT_LIT(e, ",\"request_id\":");
    put_text(e, &request_json);
    PUT_LIT(e, ",\"subject_id\":");
    put_text(e, &subj_json);
    PUT_LIT(e, "}");
    Py_ssize_t body_end = e->len;
    PUT_LIT(e, "]");
    if (e->failed)
        return 0;

    unsigned char digest[32];
    char body_hex[64];
    sha256(e->p + body_start, body_end - body_start, digest);
    to_hex(digest, body_hex);
    long long seq = r->seq + 1;
    PUT_LIT(h, "{\"action\":");
    put_text(h, &act);
    PUT_LIT(h, ",\"body\":\"");
    put(h, body_hex, 64);
    PUT_LIT(h, "\",\"chain\":");
    put_text(h, &r->chain_json);
    PUT_LIT(h, ",\"class\":");
    put_text(h, &r->class_json);
    PUT_LIT(h, ",\"outcome\":");
    put_text(h, &outcome);
    PUT_LIT(h, ",\"prev\":\"");
    put(h, r->prev_hex, 64);
    PUT_LIT(h, "\",\"seq\":");
    put_int(h, seq);
    PUT_LIT(h, ",\"subj\":");
    put_text(h, &subj_digest);
    PUT_LIT(h, ",\"ts\":");
    put_text(h, &ts_text);
    PUT_LIT(h, ",\"v\":1}");
    if (h->failed)
        return 0;
    sha256(h->p, h->len, digest);

    /* the outputs, in _format_one's order */
    PyObject *element = PyBytes_FromStringAndSize(e->p, e->len);
    if (element == NULL || PyList_Append(r->elements, element) < 0) {
        Py_XDECREF(element);
        return -1;
    }
    Py_DECREF(element);
    Py_ssize_t n = PyByteArray_GET_SIZE(r->digests);
    if (PyByteArray_Resize(r->digests, n + 32) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(r->digests) + n, digest, 32);
    PyObject *t = PyLong_FromLongLong(ts);
    if (t == NULL || PyList_Append(r->times, t) < 0) {
        Py_XDECREF(t);
        return -1;
    }
    Py_DECREF(t);
    if (PyList_Append(r->subjects, subj_text) < 0)
        return -1;
    r->seq = seq, r->last_ts = ts, r->moved = 1;
    memcpy(r->prev, digest, 32);
    to_hex(digest, r->prev_hex);
    return 1;
}

/* st = [chain, seq, prev hash hex, last ts (us), prev hash], read at the start of a run. */
static int read_head(Run *r, PyObject *st, PyObject **chain_attrs)
{
    PyObject *chain = PyList_GET_ITEM(st, 0), *seq = PyList_GET_ITEM(st, 1), *hex = PyList_GET_ITEM(st, 2);
    PyObject *last = PyList_GET_ITEM(st, 3);
    int o1, o2;
    if (!PyLong_CheckExact(seq) || !PyLong_CheckExact(last) || !PyUnicode_CheckExact(hex)
        || !PyUnicode_IS_ASCII(hex) || PyUnicode_GET_LENGTH(hex) != 64)
        return 0;
    r->seq = PyLong_AsLongLongAndOverflow(seq, &o1);
    r->last_ts = PyLong_AsLongLongAndOverflow(last, &o2);
    if (o1 || o2 || r->seq >= LLONG_MAX / 2)
        return 0;
    memcpy(r->prev_hex, PyUnicode_1BYTE_DATA(hex), 64);
    chain_attrs[0] = PyObject_GetAttrString(chain, "name_json");
    chain_attrs[1] = chain_attrs[0] == NULL ? NULL : PyObject_GetAttrString(chain, "cls_json");
    if (chain_attrs[1] == NULL || !utf8_of(chain_attrs[0], &r->chain_json) || !utf8_of(chain_attrs[1], &r->class_json)) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* ... and written back at its end, as the Python path leaves it. */
static int write_head(Run *r, PyObject *st)
{
    PyObject *vals[4] = {PyLong_FromLongLong(r->seq), PyUnicode_FromStringAndSize(r->prev_hex, 64),
                         PyLong_FromLongLong(r->last_ts), PyBytes_FromStringAndSize((const char *)r->prev, 32)};
    int ok = vals[0] && vals[1] && vals[2] && vals[3];
    for (int i = 0; i < 4; i++) {
        if (ok)
            PyList_SetItem(st, i + 1, vals[i]); /* steals */
        else
            Py_XDECREF(vals[i]);
    }
    return ok ? 0 : -1;
}

PyDoc_STRVAR(match_run_doc,
"match_run(events, start, match_actions, st, elements, digests, times, subjects) -> int\n\n"
"Format events[start:] as chain._format_one formats match records, appending to elements, digests,\n"
"times and subjects and advancing st; return the index of the first event left to Python (or len).");

static PyObject *match_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "match_run takes 8 arguments");
        return NULL;
    }
    if (setup_refs[0] == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fastchain.setup() was not called");
        return NULL;
    }
    PyObject *events = args[0], *st = args[3];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "match_run: start must be >= 0");
        return NULL;
    }
    if (!PyList_CheckExact(st) || PyList_GET_SIZE(st) != 5 || !PyList_Check(args[4])
        || !PyByteArray_CheckExact(args[5]) || !PyList_Check(args[6]) || !PyList_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError, "match_run: st must be a list of 5; elements, times and subjects lists; "
                                         "digests a bytearray");
        return NULL;
    }
    if (!PyList_CheckExact(events) || !PyAnySet_Check(args[2]) || start >= PyList_GET_SIZE(events))
        return PyLong_FromSsize_t(start);

    Run r = {.match_actions = args[2], .elements = args[4], .digests = args[5], .times = args[6],
             .subjects = args[7], .second = -1};
    PyObject *refs[N_SETUP], *chain_attrs[2] = {NULL, NULL};
    for (int j = 0; j < N_SETUP; j++) { /* held for the run: a lookup may run Python code (a key's __eq__) */
        refs[j] = setup_refs[j];
        Py_INCREF(refs[j]);
    }
    Py_ssize_t i = start;
    int error = 0;
    r.element.p = PyMem_Malloc((size_t)(r.element.cap = 1024));
    r.header.p = PyMem_Malloc((size_t)(r.header.cap = 512));
    if (r.element.p == NULL || r.header.p == NULL) {
        PyErr_NoMemory();
        error = 1;
    }
    else if (read_head(&r, st, chain_attrs)) {
        for (; i < PyList_GET_SIZE(events); i++) {
            PyObject *ev = PyList_GET_ITEM(events, i);
            if (!PyTuple_CheckExact(ev) || PyTuple_GET_SIZE(ev) != 8)
                break;
            PyObject *hold[N_HOLD] = {NULL};
            Py_INCREF(ev);
            int done = format_match(&r, ev, hold);
            for (int j = 0; j < N_HOLD; j++)
                Py_XDECREF(hold[j]);
            Py_DECREF(ev);
            if (done < 0)
                error = 1;
            if (done <= 0)
                break;
        }
    }
    if (r.moved && write_head(&r, st) < 0)
        error = 1;
    PyMem_Free(r.element.p);
    PyMem_Free(r.header.p);
    memo_clear(&r.action);
    memo_clear(&r.actor);
    memo_clear(&r.outcome);
    memo_clear(&r.subject);
    keyset_clear(&r.keys);
    Py_XDECREF(chain_attrs[0]);
    Py_XDECREF(chain_attrs[1]);
    for (int j = 0; j < N_SETUP; j++)
        Py_DECREF(refs[j]);
    return error ? NULL : PyLong_FromSsize_t(i);
}

PyDoc_STRVAR(setup_doc,
"setup(actions, actors, outcomes, subjects, seconds, key_ok, safe_text, encode_flat, encode_basestring)\n\n"
"The Python path's caches (read, never written, here) and the encoders it uses for escaped text.");

static PyObject *setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != N_SETUP) {
        PyErr_Format(PyExc_TypeError, "setup takes %d arguments", N_SETUP);
        return NULL;
    }
    for (int i = 0; i < N_SETUP; i++) {
        if (i < ENCODE_FLAT ? !PyDict_CheckExact(args[i]) : !PyCallable_Check(args[i])) {
            PyErr_Format(PyExc_TypeError, "setup argument %d must be a %s", i + 1, i < ENCODE_FLAT ? "dict" : "callable");
            return NULL;
        }
    }
    for (int i = 0; i < N_SETUP; i++) {
        Py_INCREF(args[i]);
        Py_XSETREF(setup_refs[i], args[i]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"match_run", (PyCFunction)(void (*)(void))match_run, METH_FASTCALL, match_run_doc},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL, setup_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "appliance.audit._fastchain",
    .m_doc = "The compiled match loop of appliance.audit.chain.format_copy_batch (chain._format_one is the reference).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastchain(void)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 256; i++) {
        hex_pairs[i][0] = hex[i >> 4], hex_pairs[i][1] = hex[i & 15];
        json_escaped[i] = i < 0x20 || i == '"' || i == '\\';
    }
    return PyModule_Create(&module_def);
}
