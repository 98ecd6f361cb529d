/*
 * refstorage._refscan: the oids a ZODB record's pickles reference, found by
 * walking the pickle opcodes in C.
 *
 * The answer must equal what refstorage.refs computes with
 * ZODB.serialize.referencesf (two zodbpickle `noload()` calls with a
 * persistent_load that collects the persistent ids), or there must be no
 * answer at all.  So this walker models exactly the opcodes `noload()`
 * accepts for the binary protocols 1-3 that ZODB writes, with the same stack
 * and mark discipline and the same failure conditions, and it gives up
 * (returns None) on anything else: text-protocol opcodes (but the INT and
 * LONG lines protocol 1 writes), protocol 4+,
 * non-ASCII strings, unhashable dict keys, odd persistent ids, memo indexes
 * past a small limit, trailing bytes.  Giving up is always safe: the caller
 * then asks referencesf, record by record.
 *
 * Nothing is built: a stack entry only records what kind of object noload
 * would have there, whether it is hashable, and for bytes/strings (and the
 * first item of a tuple) where its bytes are in the input.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum {
    K_NONE = 1,  /* None: NONE, GLOBAL, REDUCE, NEWOBJ, EXT*, a persistent_load result */
    K_OTHER,     /* int, float, bool: hashable, never a persistent id */
    K_BYTES,     /* bytes: usable as an oid as is */
    K_ASCII,     /* str with only ASCII characters: usable as an oid (encoded) */
    K_USTR,      /* str with other characters: hashable, not usable as an oid */
    K_TUPLE,     /* tuple: `sub`/`ptr`/`len` describe its first item */
    K_LIST,      /* list (a weak or cross-database reference when used as a pid) */
    K_DICT,
    K_EMPTY      /* `sub` of an empty tuple */
};

typedef struct {
    uint8_t kind;
    uint8_t sub;       /* K_TUPLE: kind of the first item */
    uint8_t hashable;
    const unsigned char *ptr;
    Py_ssize_t len;
} Item;

#define MEMO_LIMIT 65536      /* larger memo indexes: give up */
#define MARK_LIMIT 65536
#define STACK_LIMIT (1 << 22)
#define HIGHEST_PROTOCOL 3

typedef struct {
    Item *stack;
    Py_ssize_t size, cap;
    Py_ssize_t *marks;
    Py_ssize_t nmarks, marks_cap;
    Item *memo;
    Py_ssize_t memo_cap;
    Py_ssize_t memo_hi;          /* memo[0:memo_hi] may hold entries */
    const unsigned char **oids;  /* pointers to 8-byte oids in the input */
    Py_ssize_t noids, oids_cap;
} Scan;

#define GIVE_UP (-1)
#define NO_MEMORY (-2)

static int
push(Scan *s, Item it)
{
    if (s->size == s->cap) {
        Py_ssize_t cap = s->cap ? s->cap * 2 : 64;
        Item *n;
        if (cap > STACK_LIMIT)
            return GIVE_UP;
        n = PyMem_Realloc(s->stack, cap * sizeof(Item));
        if (n == NULL)
            return NO_MEMORY;
        s->stack = n;
        s->cap = cap;
    }
    s->stack[s->size++] = it;
    return 0;
}

static Item
simple(uint8_t kind)
{
    Item it;
    it.kind = kind;
    it.sub = 0;
    it.hashable = (kind != K_LIST && kind != K_DICT);
    it.ptr = NULL;
    it.len = 0;
    return it;
}

static Item
span(uint8_t kind, const unsigned char *ptr, Py_ssize_t len)
{
    Item it = simple(kind);
    it.ptr = ptr;
    it.len = len;
    return it;
}

/* The tuple made of stack[start:size], popped. */
static Item
make_tuple(Scan *s, Py_ssize_t start)
{
    Item it = simple(K_TUPLE);
    Py_ssize_t i;
    if (start == s->size) {
        it.sub = K_EMPTY;
    }
    else {
        Item *first = &s->stack[start];
        it.sub = first->kind;
        it.ptr = first->ptr;
        it.len = first->len;
    }
    for (i = start; i < s->size; i++)
        if (!s->stack[i].hashable)
            it.hashable = 0;
    s->size = start;
    return it;
}

static int
marker(Scan *s, Py_ssize_t *at)
{
    if (s->nmarks < 1)
        return GIVE_UP;
    *at = s->marks[--s->nmarks];
    return 0;
}

static void
clear_to(Scan *s, Py_ssize_t to)
{
    if (to < s->size)
        s->size = to;
}

static int
memo_put(Scan *s, Py_ssize_t idx)
{
    if (s->size <= 0 || idx < 0 || idx >= MEMO_LIMIT)
        return GIVE_UP;
    if (idx >= s->memo_cap) {
        Py_ssize_t cap = s->memo_cap ? s->memo_cap : 64, i;
        Item *n;
        while (cap <= idx)
            cap *= 2;
        n = PyMem_Realloc(s->memo, cap * sizeof(Item));
        if (n == NULL)
            return NO_MEMORY;
        for (i = s->memo_cap; i < cap; i++)
            n[i].kind = 0;
        s->memo = n;
        s->memo_cap = cap;
    }
    s->memo[idx] = s->stack[s->size - 1];
    if (idx >= s->memo_hi)
        s->memo_hi = idx + 1;
    return 0;
}

static int
memo_get(Scan *s, Py_ssize_t idx)
{
    if (idx < 0 || idx >= s->memo_cap || s->memo[idx].kind == 0)
        return GIVE_UP;
    return push(s, s->memo[idx]);
}

static int
add_oid(Scan *s, const unsigned char *ptr, Py_ssize_t len)
{
    if (len != 8)
        return GIVE_UP;
    if (s->noids == s->oids_cap) {
        Py_ssize_t cap = s->oids_cap ? s->oids_cap * 2 : 16;
        const unsigned char **n = PyMem_Realloc((void *)s->oids, cap * sizeof(*n));
        if (n == NULL)
            return NO_MEMORY;
        s->oids = n;
        s->oids_cap = cap;
    }
    s->oids[s->noids++] = ptr;
    return 0;
}

/* BINPERSID: what referencesf makes of the persistent id on top. */
static int
persistent_id(Scan *s)
{
    Item pid;
    int r;
    if (s->size <= 0)
        return GIVE_UP;
    pid = s->stack[--s->size];
    switch (pid.kind) {
    case K_TUPLE:
        if (pid.sub != K_BYTES && pid.sub != K_ASCII)
            return GIVE_UP;
        r = add_oid(s, pid.ptr, pid.len);
        break;
    case K_BYTES:
    case K_ASCII:
        r = add_oid(s, pid.ptr, pid.len);
        break;
    case K_LIST:  /* weak or cross-database reference: not counted */
        r = 0;
        break;
    default:
        return GIVE_UP;
    }
    if (r < 0)
        return r;
    return push(s, simple(K_NONE));  /* persistent_load's result */
}

static int
all_ascii(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        if (p[i] & 0x80)
            return 0;
    return 1;
}

static uint32_t
le32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* INT ('I') and LONG ('L') lines as protocol 1 writes them: an optional
 * minus, then 0 or digits without a leading zero (plus "00"/"01" for bools
 * after INT, a trailing 'L' after LONG), then a newline.  Anything else is
 * declined, though strtol/PyLong_FromString might read it. */
static int
decimal_line(const unsigned char *buf, Py_ssize_t n, Py_ssize_t *pos, int is_long)
{
    Py_ssize_t p = *pos, start, digits;
    const unsigned char *nl = memchr(buf + p, '\n', n - p);
    Py_ssize_t end;
    if (nl == NULL)
        return GIVE_UP;
    end = nl - buf;
    if (is_long && end > p && buf[end - 1] == 'L')
        end--;
    if (!is_long && end - p == 2 && buf[p] == '0' && (buf[p + 1] == '0' || buf[p + 1] == '1')) {
        *pos = nl - buf + 1;
        return 0;
    }
    if (p < end && buf[p] == '-')
        p++;
    start = p;
    while (p < end && buf[p] >= '0' && buf[p] <= '9')
        p++;
    digits = p - start;
    if (p != end || digits == 0 || digits > 4000 || (digits > 1 && buf[start] == '0'))
        return GIVE_UP;
    *pos = nl - buf + 1;
    return 0;
}

/* APPEND/APPENDS as noload does them: onto a list, or dropped onto None. */
static int
appends(Scan *s, Py_ssize_t x)
{
    uint8_t kind;
    if (x > s->size || x <= 0)
        return GIVE_UP;
    if (x == s->size)
        return 0;
    kind = s->stack[x - 1].kind;
    if (kind != K_LIST && kind != K_NONE)
        return GIVE_UP;
    s->size = x;
    return 0;
}

/* SETITEM/SETITEMS as noload does them: into a dict, or dropped onto None. */
static int
setitems(Scan *s, Py_ssize_t x)
{
    Py_ssize_t i;
    uint8_t kind;
    if (x > s->size || x <= 0)
        return GIVE_UP;
    kind = s->stack[x - 1].kind;
    if (kind == K_NONE) {
        s->size = x;
        return 0;
    }
    if (x == s->size)
        return 0;
    if ((s->size - x) % 2 != 0 || kind != K_DICT)
        return GIVE_UP;
    for (i = x; i < s->size; i += 2)
        if (!s->stack[i].hashable)
            return GIVE_UP;
    s->size = x;
    return 0;
}

/* Walk one pickle from *pos to its STOP. */
static int
walk(Scan *s, const unsigned char *buf, Py_ssize_t n, Py_ssize_t *pos)
{
    Py_ssize_t p = *pos, x, len;
    int r = 0;
    s->size = 0;
    s->nmarks = 0;

#define NEED(k) do { if (n - p < (Py_ssize_t)(k)) return GIVE_UP; } while (0)
#define PUSH(it) do { if ((r = push(s, (it))) < 0) return r; } while (0)
#define CHECK(call) do { if ((r = (call)) < 0) return r; } while (0)

    for (;;) {
        unsigned char op;
        NEED(1);
        op = buf[p++];
        switch (op) {
        case 'N':  /* NONE */
            PUSH(simple(K_NONE));
            break;
        case 'J':  /* BININT */
            NEED(4); p += 4;
            PUSH(simple(K_OTHER));
            break;
        case 'K':  /* BININT1 */
            NEED(1); p += 1;
            PUSH(simple(K_OTHER));
            break;
        case 'M':  /* BININT2 */
            NEED(2); p += 2;
            PUSH(simple(K_OTHER));
            break;
        case 0x8a:  /* LONG1 */
            NEED(1); len = buf[p]; p += 1;
            NEED(len); p += len;
            PUSH(simple(K_OTHER));
            break;
        case 0x8b:  /* LONG4: signed count */
            NEED(4); len = (int32_t)le32(buf + p); p += 4;
            if (len < 0)
                return GIVE_UP;
            NEED(len); p += len;
            PUSH(simple(K_OTHER));
            break;
        case 'I':  /* INT (protocol 1 writes bools and 64-bit ints so) */
        case 'L':  /* LONG (protocol 1 writes big ints so) */
            CHECK(decimal_line(buf, n, &p, op == 'L'));
            PUSH(simple(K_OTHER));
            break;
        case 'G':  /* BINFLOAT */
            NEED(8); p += 8;
            PUSH(simple(K_OTHER));
            break;
        case 0x88:  /* NEWTRUE */
        case 0x89:  /* NEWFALSE */
            PUSH(simple(K_OTHER));
            break;
        case 'T':  /* BINSTRING: signed count, decoded as ASCII (strict) */
            NEED(4); len = (int32_t)le32(buf + p); p += 4;
            if (len < 0)
                return GIVE_UP;
            NEED(len);
            if (!all_ascii(buf + p, len))
                return GIVE_UP;
            PUSH(span(K_ASCII, buf + p, len));
            p += len;
            break;
        case 'U':  /* SHORT_BINSTRING */
            NEED(1); len = buf[p]; p += 1;
            NEED(len);
            if (!all_ascii(buf + p, len))
                return GIVE_UP;
            PUSH(span(K_ASCII, buf + p, len));
            p += len;
            break;
        case 'X':  /* BINUNICODE: UTF-8, surrogatepass */
            NEED(4); len = le32(buf + p); p += 4;
            NEED(len);
            if (all_ascii(buf + p, len)) {
                PUSH(span(K_ASCII, buf + p, len));
            }
            else {
                PyObject *u = PyUnicode_DecodeUTF8((const char *)buf + p, len, "surrogatepass");
                if (u == NULL) {
                    PyErr_Clear();
                    return GIVE_UP;
                }
                Py_DECREF(u);
                PUSH(simple(K_USTR));
            }
            p += len;
            break;
        case 'B':  /* BINBYTES: unsigned count */
            NEED(4); len = le32(buf + p); p += 4;
            NEED(len);
            PUSH(span(K_BYTES, buf + p, len));
            p += len;
            break;
        case 'C':  /* SHORT_BINBYTES */
            NEED(1); len = buf[p]; p += 1;
            NEED(len);
            PUSH(span(K_BYTES, buf + p, len));
            p += len;
            break;
        case ')':  /* EMPTY_TUPLE */
            PUSH(make_tuple(s, s->size));
            break;
        case 0x85:  /* TUPLE1 */
        case 0x86:  /* TUPLE2 */
        case 0x87:  /* TUPLE3 */
            len = op - 0x84;
            if (s->size < len)
                return GIVE_UP;
            PUSH(make_tuple(s, s->size - len));
            break;
        case 't':  /* TUPLE */
            CHECK(marker(s, &x));
            if (x > s->size)
                return GIVE_UP;
            PUSH(make_tuple(s, x));
            break;
        case ']':  /* EMPTY_LIST */
            PUSH(simple(K_LIST));
            break;
        case 'l':  /* LIST */
            CHECK(marker(s, &x));
            if (x > s->size)
                return GIVE_UP;
            s->size = x;
            PUSH(simple(K_LIST));
            break;
        case '}':  /* EMPTY_DICT */
            PUSH(simple(K_DICT));
            break;
        case 'd': {  /* DICT: pairs above the mark; an odd last item is ignored */
            Py_ssize_t k;
            CHECK(marker(s, &x));
            for (k = x + 1; k < s->size; k += 2)
                if (!s->stack[k - 1].hashable)
                    return GIVE_UP;
            clear_to(s, x);
            PUSH(simple(K_DICT));
            break;
        }
        case 'o':  /* OBJ: keeps the item just above the mark */
            CHECK(marker(s, &x));
            clear_to(s, x + 1);
            break;
        case 0x81:  /* NEWOBJ */
            if (s->size < 2)
                return GIVE_UP;
            s->size -= 2;
            PUSH(simple(K_NONE));
            break;
        case 'c': {  /* GLOBAL: two lines, not looked at */
            int lines;
            for (lines = 0; lines < 2; lines++) {
                const unsigned char *nl = memchr(buf + p, '\n', n - p);
                if (nl == NULL)
                    return GIVE_UP;
                p = nl - buf + 1;
            }
            PUSH(simple(K_NONE));
            break;
        }
        case 'R':  /* REDUCE */
            if (s->size < 2)
                return GIVE_UP;
            s->size -= 2;
            PUSH(simple(K_NONE));
            break;
        case 'b':  /* BUILD */
            if (s->size < 1)
                return GIVE_UP;
            s->size -= 1;
            break;
        case 'a':  /* APPEND */
            CHECK(appends(s, s->size - 1));
            break;
        case 'e':  /* APPENDS */
            CHECK(marker(s, &x));
            CHECK(appends(s, x));
            break;
        case 's':  /* SETITEM */
            CHECK(setitems(s, s->size - 2));
            break;
        case 'u':  /* SETITEMS */
            CHECK(marker(s, &x));
            CHECK(setitems(s, x));
            break;
        case '2':  /* DUP */
            if (s->size <= 0)
                return GIVE_UP;
            PUSH(s->stack[s->size - 1]);
            break;
        case 'h':  /* BINGET */
            NEED(1);
            CHECK(memo_get(s, buf[p]));
            p += 1;
            break;
        case 'j':  /* LONG_BINGET */
            NEED(4);
            CHECK(memo_get(s, le32(buf + p)));
            p += 4;
            break;
        case 'q':  /* BINPUT */
            NEED(1);
            CHECK(memo_put(s, buf[p]));
            p += 1;
            break;
        case 'r':  /* LONG_BINPUT */
            NEED(4);
            CHECK(memo_put(s, le32(buf + p)));
            p += 4;
            break;
        case 0x82:  /* EXT1 */
        case 0x83:  /* EXT2 */
        case 0x84:  /* EXT4 */
            len = op == 0x82 ? 1 : op == 0x83 ? 2 : 4;
            NEED(len); p += len;
            PUSH(simple(K_NONE));
            break;
        case '(':  /* MARK */
            if (s->nmarks == s->marks_cap) {
                Py_ssize_t cap = s->marks_cap ? s->marks_cap * 2 : 32;
                Py_ssize_t *m;
                if (cap > MARK_LIMIT)
                    return GIVE_UP;
                m = PyMem_Realloc(s->marks, cap * sizeof(Py_ssize_t));
                if (m == NULL)
                    return NO_MEMORY;
                s->marks = m;
                s->marks_cap = cap;
            }
            s->marks[s->nmarks++] = s->size;
            break;
        case '0':  /* POP: the mark on top if it is at the top of the stack */
            if (s->nmarks > 0 && s->marks[s->nmarks - 1] == s->size)
                s->nmarks--;
            else if (s->size > 0)
                s->size--;
            else
                return GIVE_UP;
            break;
        case '1':  /* POP_MARK */
            CHECK(marker(s, &x));
            clear_to(s, x);
            break;
        case 'Q':  /* BINPERSID */
            CHECK(persistent_id(s));
            break;
        case 0x80:  /* PROTO */
            NEED(1);
            if (buf[p] > HIGHEST_PROTOCOL)
                return GIVE_UP;
            p += 1;
            break;
        case '.':  /* STOP */
            if (s->size <= 0)
                return GIVE_UP;
            *pos = p;
            return 0;
        default:  /* text-protocol and protocol 4+ opcodes, garbage */
            return GIVE_UP;
        }
    }
#undef NEED
#undef PUSH
#undef CHECK
}

static uint64_t
oid_key(const unsigned char *o)
{
    uint64_t k;
    memcpy(&k, o, 8);
    return k;
}

/* Drop repeated oids from s->oids, keeping first occurrences in order (as
 * pack_refs does); the new count, or -1 when out of memory. */
static Py_ssize_t
unique_oids(Scan *s)
{
    Py_ssize_t i, j, out = 0, slots;
    Py_ssize_t *table;

    if (s->noids <= 16) {
        for (i = 0; i < s->noids; i++) {
            const unsigned char *o = s->oids[i];
            for (j = 0; j < out; j++)
                if (memcmp(s->oids[j], o, 8) == 0)
                    break;
            if (j == out)
                s->oids[out++] = o;
        }
        return out;
    }
    for (slots = 64; slots < 2 * s->noids; slots *= 2)
        ;
    table = PyMem_Malloc(slots * sizeof(Py_ssize_t));
    if (table == NULL)
        return -1;
    for (j = 0; j < slots; j++)
        table[j] = -1;
    for (i = 0; i < s->noids; i++) {
        const unsigned char *o = s->oids[i];
        uint64_t k = oid_key(o);
        Py_ssize_t h = (Py_ssize_t)((k * 0x9E3779B97F4A7C15ULL) >> 20) & (slots - 1);
        for (;;) {
            if (table[h] < 0) {
                table[h] = out;
                s->oids[out++] = o;
                break;
            }
            if (oid_key(s->oids[table[h]]) == k)
                break;
            h = (h + 1) & (slots - 1);
        }
    }
    PyMem_Free(table);
    return out;
}

/* The packed references of one record (as bytes), None to give up, NULL on error. */
static PyObject *
scan_record(Scan *s, PyObject *data)
{
    const unsigned char *buf;
    Py_ssize_t n, pos = 0, i, out;
    PyObject *result;
    char *dst;
    int r;

    if (!PyBytes_Check(data))
        Py_RETURN_NONE;
    buf = (const unsigned char *)PyBytes_AS_STRING(data);
    n = PyBytes_GET_SIZE(data);
    s->noids = 0;
    for (i = 0; i < s->memo_hi; i++)
        s->memo[i].kind = 0;
    s->memo_hi = 0;
    r = walk(s, buf, n, &pos);           /* the class pickle */
    if (r == 0)
        r = walk(s, buf, n, &pos);       /* the state pickle (same memo) */
    if (r == NO_MEMORY)
        return PyErr_NoMemory();
    if (r < 0 || pos != n)
        Py_RETURN_NONE;

    out = unique_oids(s);
    if (out < 0)
        return PyErr_NoMemory();
    result = PyBytes_FromStringAndSize(NULL, out * 8);
    if (result == NULL)
        return NULL;
    dst = PyBytes_AS_STRING(result);
    for (i = 0; i < out; i++)
        memcpy(dst + 8 * i, s->oids[i], 8);
    return result;
}

static void
scan_free(Scan *s)
{
    PyMem_Free(s->stack);
    PyMem_Free(s->marks);
    PyMem_Free(s->memo);
    PyMem_Free((void *)s->oids);
}

PyDoc_STRVAR(scan_doc,
"scan(data) -> bytes | None\n\n"
"The record's references as the refs field stores them (8-byte oids,\n"
"repeats dropped), or None when the pickle is outside what the scanner\n"
"models and referencesf must be asked.");

static PyObject *
scan(PyObject *module, PyObject *data)
{
    Scan s;
    PyObject *result;
    memset(&s, 0, sizeof(s));
    result = scan_record(&s, data);
    scan_free(&s);
    return result;
}

PyDoc_STRVAR(scan_many_doc,
"scan_many(datas) -> list[bytes | None]\n\n"
"scan() of each item of a sequence, sharing the scanner's buffers.");

static PyObject *
scan_many(PyObject *module, PyObject *datas)
{
    Scan s;
    PyObject *seq, *result;
    Py_ssize_t i, n;

    seq = PySequence_Fast(datas, "scan_many() needs a sequence");
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    result = PyList_New(n);
    if (result == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    memset(&s, 0, sizeof(s));
    for (i = 0; i < n; i++) {
        PyObject *one = scan_record(&s, PySequence_Fast_GET_ITEM(seq, i));
        if (one == NULL) {
            Py_DECREF(result);
            result = NULL;
            break;
        }
        PyList_SET_ITEM(result, i, one);
    }
    scan_free(&s);
    Py_DECREF(seq);
    return result;
}

/* -- pack: relocating the kept data records of a transaction ------------------
 *
 * The C twin of fileformat.relocate_kept (the pure-Python path, which is also
 * the reference: its docstring is the specification).  It applies the same
 * checks to each record; where one fails it does not raise but returns
 * RELOC_BAD at that record, and the caller runs the Python path on it, which
 * raises the package's error naming the file and offset.  So there is one set
 * of error messages, and this loop only has to say "not this one".
 */

#define DATA_HEADER_SIZE 42
#define CRC_SIZE 4
#define REF_SIZE 8
#define FLAG_BACKPOINTER 1
#define KNOWN_FLAGS 3
#define MIN_RECORD 46

enum { RELOC_DONE = 0, RELOC_STOP, RELOC_BAD, RELOC_FULL, RELOC_OUTSIDE };

static uint64_t
be64(const unsigned char *p)
{
    uint64_t v = 0;
    int k;
    for (k = 0; k < 8; k++)
        v = (v << 8) | p[k];
    return v;
}

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void
put64(unsigned char *p, uint64_t v)
{
    int k;
    for (k = 7; k >= 0; k--) {
        p[k] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* zlib's crc32, through the zlib module would cost a call per record: a table-driven copy. */
static uint32_t crc_table[8][256];
static int crc_ready = 0;

static void
crc_init(void)
{
    uint32_t c;
    int n, k;
    for (n = 0; n < 256; n++) {
        c = (uint32_t)n;
        for (k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (n = 0; n < 256; n++) {
        c = crc_table[0][n];
        for (k = 1; k < 8; k++) {
            c = crc_table[0][c & 0xff] ^ (c >> 8);
            crc_table[k][n] = c;
        }
    }
    crc_ready = 1;
}

static uint32_t
crc32_update(uint32_t crc, const unsigned char *p, Py_ssize_t n)
{
    crc = ~crc;
    while (n >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
                             | ((uint32_t)p[3] << 24));
        uint32_t hi = (uint32_t)p[4] | ((uint32_t)p[5] << 8) | ((uint32_t)p[6] << 16)
                      | ((uint32_t)p[7] << 24);
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff]
              ^ crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24]
              ^ crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff]
              ^ crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n-- > 0)
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* Append n bytes to a bytearray; a pointer to them, NULL (exception set) on failure. */
static unsigned char *
grow(PyObject *ba, Py_ssize_t n)
{
    Py_ssize_t size = PyByteArray_GET_SIZE(ba);
    if (PyByteArray_Resize(ba, size + n) < 0)
        return NULL;
    return (unsigned char *)PyByteArray_AS_STRING(ba) + size;
}

PyDoc_STRVAR(relocate_doc,
"relocate(buf, base, starts, i, n, keep, tid, old_tpos, new_tpos, pos, prev_of,\n"
"         targets, out, table, moved, limit) -> (i, pos, kept, status)\n\n"
"fileformat.relocate_kept in C (see there); status RELOC_BAD (2) at record i\n"
"where the Python path raises.");

static PyObject *
relocate(PyObject *module, PyObject *args)
{
    Py_buffer buf, starts, keep, tid, targets = {0};
    long long base_ll, old_tpos_ll, new_tpos_ll, pos_ll;
    Py_ssize_t i, n, limit, kept = 0;
    PyObject *prev_of, *targets_obj, *out, *table, *moved, *result = NULL;
    int status = RELOC_DONE;
    uint64_t base, old_tpos, new_tpos, pos;
    const uint64_t *st;
    const uint64_t *tg = NULL;
    Py_ssize_t ntg = 0, nst;
    unsigned char hdr[DATA_HEADER_SIZE];

    if (!PyArg_ParseTuple(args, "y*Ly*nny*y*LLLOOO!O!O!n:relocate", &buf, &base_ll, &starts, &i,
                          &n, &keep, &tid, &old_tpos_ll, &new_tpos_ll, &pos_ll, &prev_of,
                          &targets_obj, &PyByteArray_Type, &out, &PyByteArray_Type, &table,
                          &PyByteArray_Type, &moved, &limit))
        return NULL;
    if (!crc_ready)
        crc_init();
    base = (uint64_t)base_ll;
    old_tpos = (uint64_t)old_tpos_ll;
    new_tpos = (uint64_t)new_tpos_ll;
    pos = (uint64_t)pos_ll;
    if (targets_obj != Py_None) {
        if (PyObject_GetBuffer(targets_obj, &targets, PyBUF_SIMPLE) < 0)
            goto done;
        tg = (const uint64_t *)targets.buf;
        ntg = targets.len / 8;
    }
    st = (const uint64_t *)starts.buf;
    nst = starts.len / 8;
    if (tid.len != 8 || n >= nst || i < 0) {
        PyErr_SetString(PyExc_ValueError, "relocate: bad arguments");
        goto done;
    }
    for (; i < n; i++) {
        uint64_t at = st[i], next = st[i + 1], slot, rtid_pos, prev = 0;
        uint64_t length, nrefs, dlen, body_end, off;
        const unsigned char *rec;
        unsigned flags;
        unsigned char *dst;
        uint32_t crc;

        slot = at / MIN_RECORD;
        if ((Py_ssize_t)(slot >> 3) >= keep.len
            || !(((const unsigned char *)keep.buf)[slot >> 3] & (1u << (slot & 7))))
            continue;  /* not kept */
        if (next <= at) {
            status = RELOC_BAD;
            break;
        }
        length = next - at;
        if (at < base || next - base > (uint64_t)buf.len) {
            status = RELOC_OUTSIDE;
            break;
        }
        if (length < DATA_HEADER_SIZE) {
            status = RELOC_BAD;
            break;
        }
        off = at - base;
        rec = (const unsigned char *)buf.buf + off;
        flags = ((unsigned)rec[32] << 8) | rec[33];
        if (flags & FLAG_BACKPOINTER) {
            status = RELOC_STOP;
            break;
        }
        if (flags & ~KNOWN_FLAGS) {
            status = RELOC_BAD;
            break;
        }
        nrefs = be32(rec + 34);
        dlen = be32(rec + 38);
        body_end = DATA_HEADER_SIZE + REF_SIZE * nrefs + dlen;
        rtid_pos = be64(rec + 24);
        if (body_end + CRC_SIZE != length || memcmp(rec + 8, tid.buf, 8) != 0
            || rtid_pos != old_tpos) {
            status = RELOC_BAD;
            break;
        }
        if (crc32_update(0, rec, (Py_ssize_t)body_end) != be32(rec + body_end)) {
            status = RELOC_BAD;
            break;
        }
        if (PyByteArray_GET_SIZE(out) >= limit) {
            status = RELOC_FULL;
            break;
        }
        if (prev_of != Py_None) {
            PyObject *oid = PyBytes_FromStringAndSize((const char *)rec, 8);
            PyObject *p;
            if (oid == NULL)
                goto done;
            p = PyObject_CallFunctionObjArgs(prev_of, oid, NULL);
            Py_DECREF(oid);
            if (p == NULL)
                goto done;
            prev = PyLong_AsUnsignedLongLong(p);
            Py_DECREF(p);
            if (prev == (uint64_t)-1 && PyErr_Occurred())
                goto done;
        }
        memcpy(hdr, rec, DATA_HEADER_SIZE);
        put64(hdr + 16, prev);
        put64(hdr + 24, new_tpos);
        dst = grow(out, (Py_ssize_t)length);
        if (dst == NULL)
            goto done;
        memcpy(dst, hdr, DATA_HEADER_SIZE);
        memcpy(dst + DATA_HEADER_SIZE, rec + DATA_HEADER_SIZE, (size_t)(body_end - DATA_HEADER_SIZE));
        crc = crc32_update(crc32_update(0, hdr, DATA_HEADER_SIZE), rec + DATA_HEADER_SIZE,
                           (Py_ssize_t)(body_end - DATA_HEADER_SIZE));
        dst[body_end] = (unsigned char)(crc >> 24);
        dst[body_end + 1] = (unsigned char)(crc >> 16);
        dst[body_end + 2] = (unsigned char)(crc >> 8);
        dst[body_end + 3] = (unsigned char)crc;
        dst = grow(table, 16);
        if (dst == NULL)
            goto done;
        memcpy(dst, rec, 8);
        put64(dst + 8, pos);
        if (ntg) {  /* a kept backpointer's target: note old -> new (sorted targets) */
            Py_ssize_t lo = 0, hi = ntg;
            while (lo < hi) {
                Py_ssize_t mid = (lo + hi) / 2;
                if (tg[mid] < at)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (lo < ntg && tg[lo] == at) {
                uint64_t pair[2];
                pair[0] = at;
                pair[1] = pos;
                dst = grow(moved, 16);
                if (dst == NULL)
                    goto done;
                memcpy(dst, pair, 16);
            }
        }
        pos += length;
        kept++;
    }
    result = Py_BuildValue("nKni", i, (unsigned long long)pos, kept, status);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&keep);
    PyBuffer_Release(&tid);
    if (targets.obj != NULL)
        PyBuffer_Release(&targets);
    return result;
}

PyDoc_STRVAR(dense_check_doc,
"dense_check(payloads, counts, maxima) -> int\n\n"
"The first dense block of an index file whose stored entry count or largest\n"
"position does not match its 256 6-byte big-endian positions, or -1 if all\n"
"match.  `payloads`: nd blocks of 1536 bytes; `counts`: array('H') of nd;\n"
"`maxima`: array('Q') of nd.  Twin of indexfile._dense_check.");

static PyObject *
dense_check(PyObject *module, PyObject *args)
{
    Py_buffer pay, counts, maxima;
    Py_ssize_t nd, b, bad = -1;

    if (!PyArg_ParseTuple(args, "y*y*y*:dense_check", &pay, &counts, &maxima))
        return NULL;
    nd = pay.len / 1536;
    if (pay.len != nd * 1536 || counts.len != nd * 2 || maxima.len != nd * 8) {
        PyBuffer_Release(&pay);
        PyBuffer_Release(&counts);
        PyBuffer_Release(&maxima);
        PyErr_SetString(PyExc_ValueError, "dense_check: sizes do not match");
        return NULL;
    }
    for (b = 0; b < nd; b++) {
        const unsigned char *p = (const unsigned char *)pay.buf + 1536 * b;
        unsigned c = 0, j;
        uint64_t top = 0;
        /* 8-byte loads (the entry and 2 bytes of the next; the file's very last entry is
           read bytewise), turned into the 48-bit big-endian value */
        unsigned last = (b == nd - 1) ? 255 : 256;
        for (j = 0; j < last; j++, p += 6) {
            uint64_t w, v;
            memcpy(&w, p, 8);
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            v = __builtin_bswap64(w) >> 16;
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
            v = w >> 16;
#else
            v = ((uint64_t)p[0] << 40) | ((uint64_t)p[1] << 32) | ((uint64_t)p[2] << 24)
                | ((uint64_t)p[3] << 16) | ((uint64_t)p[4] << 8) | p[5];
            (void)w;
#endif
            c += v != 0;
            top = v > top ? v : top;
        }
        for (; j < 256; j++, p += 6) {
            uint64_t v = ((uint64_t)p[0] << 40) | ((uint64_t)p[1] << 32) | ((uint64_t)p[2] << 24)
                         | ((uint64_t)p[3] << 16) | ((uint64_t)p[4] << 8) | p[5];
            c += v != 0;
            top = v > top ? v : top;
        }
        if (c != ((const uint16_t *)counts.buf)[b] || top != ((const uint64_t *)maxima.buf)[b]) {
            bad = b;
            break;
        }
    }
    PyBuffer_Release(&pay);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&maxima);
    return PyLong_FromSsize_t(bad);
}

PyDoc_STRVAR(count_kept_doc,
"count_kept(starts, n, keep) -> int\n\n"
"How many of starts[0:n] (an array('Q') of record positions) have their bit\n"
"pos // 46 set in the bitmap `keep` (a position past the bitmap: not set).");

static PyObject *
count_kept(PyObject *module, PyObject *args)
{
    Py_buffer starts, keep;
    Py_ssize_t n, i, count = 0;
    const uint64_t *st;
    const unsigned char *k;

    if (!PyArg_ParseTuple(args, "y*ny*:count_kept", &starts, &n, &keep))
        return NULL;
    st = (const uint64_t *)starts.buf;
    k = (const unsigned char *)keep.buf;
    if (n < 0 || n > starts.len / 8)
        n = starts.len / 8;
    for (i = 0; i < n; i++) {
        uint64_t slot = st[i] / MIN_RECORD;
        if ((Py_ssize_t)(slot >> 3) < keep.len && k[slot >> 3] & (1u << (slot & 7)))
            count++;
    }
    PyBuffer_Release(&starts);
    PyBuffer_Release(&keep);
    return PyLong_FromSsize_t(count);
}

#define FLAG_REFS_UNKNOWN 2

PyDoc_STRVAR(gc_refs_doc,
"gc_refs(window, wpos, positions, i, n, pack_pos, refs, check_all=0) -> (i, status)\n\n"
"Pack's marking loop over positions[i:n] (ascending record positions), for\n"
"the common case only: a record before `pack_pos`, wholly in `window` (the\n"
"file from `wpos`), with stored references and no backpointer.  Its header\n"
"is checked as fileformat.peek_data_header does and its checksum as\n"
"decode_data_record does, and its references are appended to `refs`; a\n"
"record without references is passed over (its header checked).  Stops at\n"
"the first position it does not handle: status 0 done (i == n), 1 the\n"
"record at i is for the Python path (after the pack position, a\n"
"backpointer, references not stored, not wholly in the window, or failing\n"
"a check: the Python path raises the error), 4 its header is not in the\n"
"window (read another one).  With check_all, a record without references\n"
"is checksummed too (so must be wholly in the window).");

static PyObject *
gc_refs(PyObject *module, PyObject *args)
{
    Py_buffer win, positions;
    long long wpos_ll, pack_pos_ll;
    Py_ssize_t i, n, np;
    PyObject *refs;
    int status = RELOC_DONE, check_all = 0;
    uint64_t wpos, pack_pos;
    const uint64_t *ps;

    if (!PyArg_ParseTuple(args, "y*Ly*nnLO!|i:gc_refs", &win, &wpos_ll, &positions, &i, &n,
                          &pack_pos_ll, &PyByteArray_Type, &refs, &check_all))
        return NULL;
    if (!crc_ready)
        crc_init();
    wpos = (uint64_t)wpos_ll;
    pack_pos = (uint64_t)pack_pos_ll;
    if (i < 0 || wpos_ll < 0 || pack_pos_ll < 0) {
        PyBuffer_Release(&win);
        PyBuffer_Release(&positions);
        PyErr_SetString(PyExc_ValueError, "gc_refs: negative index or position");
        return NULL;
    }
    ps = (const uint64_t *)positions.buf;
    np = positions.len / 8;
    if (n > np)
        n = np;
    for (; i < n; i++) {
        uint64_t pos = ps[i], off, length, nrefs, dlen;
        const unsigned char *rec;
        unsigned flags;
        unsigned char *dst;

        if (pos >= pack_pos) {
            status = RELOC_STOP;
            break;
        }
        if (pos < wpos || pos - wpos + DATA_HEADER_SIZE > (uint64_t)win.len) {
            status = RELOC_OUTSIDE;
            break;
        }
        off = pos - wpos;
        rec = (const unsigned char *)win.buf + off;
        flags = ((unsigned)rec[32] << 8) | rec[33];
        nrefs = be32(rec + 34);
        dlen = be32(rec + 38);
        if (flags & ~KNOWN_FLAGS || flags & (FLAG_BACKPOINTER | FLAG_REFS_UNKNOWN)) {
            status = RELOC_STOP;
            break;
        }
        if (!nrefs && !check_all)
            continue;  /* kept, nothing to follow */
        length = DATA_HEADER_SIZE + REF_SIZE * nrefs + dlen + CRC_SIZE;
        if (off + length > (uint64_t)win.len
            || crc32_update(0, rec, (Py_ssize_t)(length - CRC_SIZE)) != be32(rec + length - CRC_SIZE)) {
            status = RELOC_STOP;
            break;
        }
        if (!nrefs)
            continue;
        dst = grow(refs, (Py_ssize_t)(REF_SIZE * nrefs));
        if (dst == NULL) {
            PyBuffer_Release(&win);
            PyBuffer_Release(&positions);
            return NULL;
        }
        memcpy(dst, rec + DATA_HEADER_SIZE, (size_t)(REF_SIZE * nrefs));
    }
    PyBuffer_Release(&win);
    PyBuffer_Release(&positions);
    return Py_BuildValue("ni", i, status);
}

PyDoc_STRVAR(check_records_doc,
"check_records(buf, base, table, data_pos, records_end, tid, tpos, info) -> (n, ok)\n\n"
"verify's record check of one transaction, the C twin of log._checked_records:\n"
"`buf` holds the file from `base` (the transaction's records at least),\n"
"`table` its oid table entries (16 bytes each).  Each record must start where\n"
"the previous one ends (the first at data_pos) and where its entry says, have\n"
"a consistent header (peek_data_header's rules), end by records_end, pass its\n"
"checksum and name the entry's oid, `tid` and `tpos`; the records must end\n"
"exactly at records_end.  For each good record, (prev, backpointer or 0,\n"
"flags) are appended to `info` as three native Q.  Returns how many records\n"
"passed and whether all did (ok 0: the Python path names the error).");

static PyObject *
check_records(PyObject *module, PyObject *args)
{
    Py_buffer buf, table, tid;
    long long base_ll, data_pos_ll, end_ll, tpos_ll;
    PyObject *info;
    Py_ssize_t i = 0, nrec;
    int ok = 1;
    uint64_t base, pos, end, tpos;

    if (!PyArg_ParseTuple(args, "y*Ly*LLy*LO!:check_records", &buf, &base_ll, &table, &data_pos_ll,
                          &end_ll, &tid, &tpos_ll, &PyByteArray_Type, &info))
        return NULL;
    if (!crc_ready)
        crc_init();
    base = (uint64_t)base_ll;
    pos = (uint64_t)data_pos_ll;
    end = (uint64_t)end_ll;
    tpos = (uint64_t)tpos_ll;
    nrec = table.len / 16;
    if (tid.len != 8 || pos < base || end - base > (uint64_t)buf.len || end < pos) {
        ok = 0;
        goto done;
    }
    for (i = 0; i < nrec; i++) {
        const unsigned char *entry = (const unsigned char *)table.buf + 16 * i;
        const unsigned char *rec;
        uint64_t length, nrefs, dlen, out[3];
        unsigned flags;
        unsigned char *dst;

        if (pos >= end || pos != be64(entry + 8) || pos + DATA_HEADER_SIZE > end) {
            ok = 0;
            break;
        }
        rec = (const unsigned char *)buf.buf + (pos - base);
        flags = ((unsigned)rec[32] << 8) | rec[33];
        nrefs = be32(rec + 34);
        dlen = be32(rec + 38);
        if (flags & ~KNOWN_FLAGS || (flags & FLAG_BACKPOINTER && (dlen || nrefs))) {
            ok = 0;
            break;
        }
        length = DATA_HEADER_SIZE + REF_SIZE * nrefs + (flags & FLAG_BACKPOINTER ? 8 : dlen) + CRC_SIZE;
        if (pos + length > end
            || crc32_update(0, rec, (Py_ssize_t)(length - CRC_SIZE)) != be32(rec + length - CRC_SIZE)
            || memcmp(rec, entry, 8) != 0 || memcmp(rec + 8, tid.buf, 8) != 0
            || be64(rec + 24) != tpos) {
            ok = 0;
            break;
        }
        out[0] = be64(rec + 16);
        out[1] = flags & FLAG_BACKPOINTER ? be64(rec + DATA_HEADER_SIZE) : 0;
        out[2] = flags;
        dst = grow(info, 24);
        if (dst == NULL) {
            PyBuffer_Release(&buf);
            PyBuffer_Release(&table);
            PyBuffer_Release(&tid);
            return NULL;
        }
        memcpy(dst, out, 24);
        pos += length;
    }
    if (ok && pos != end)
        ok = 0;
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&table);
    PyBuffer_Release(&tid);
    return Py_BuildValue("ni", i, ok);
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* LSD radix sort, 16-bit digits, only over the digits the largest value has;
 * -1 (nothing changed) when the scratch buffer cannot be had. */
static int
radix_sort_u64(uint64_t *a, Py_ssize_t n)
{
    uint64_t *tmp, *src = a, *dst, top = 0;
    Py_ssize_t i, *count;
    int shift;

    if (n < 64) {
        qsort(a, (size_t)n, 8, cmp_u64);
        return 0;
    }
    for (i = 0; i < n; i++)
        top |= a[i];
    tmp = PyMem_Malloc((size_t)n * 8);
    count = PyMem_Malloc(65536 * sizeof(Py_ssize_t));
    if (tmp == NULL || count == NULL) {
        PyMem_Free(tmp);
        PyMem_Free(count);
        return -1;
    }
    dst = tmp;
    for (shift = 0; shift < 64 && (top >> shift); shift += 16) {
        Py_ssize_t sum = 0;
        uint64_t *t;
        memset(count, 0, 65536 * sizeof(Py_ssize_t));
        for (i = 0; i < n; i++)
            count[(src[i] >> shift) & 0xffff]++;
        for (i = 0; i < 65536; i++) {
            Py_ssize_t c = count[i];
            count[i] = sum;
            sum += c;
        }
        for (i = 0; i < n; i++)
            dst[count[(src[i] >> shift) & 0xffff]++] = src[i];
        t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, (size_t)n * 8);
    PyMem_Free(tmp);
    PyMem_Free(count);
    return 0;
}

PyDoc_STRVAR(sort_positions_doc,
"sort_positions(positions) -> None\n\n"
"Sort an array('Q') in place (no list of a million ints on the way).");

static PyObject *
sort_positions(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return NULL;
    if (view.itemsize != 8 || view.format == NULL || strcmp(view.format, "Q") != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "sort_positions() needs an array('Q')");
        return NULL;
    }
    if (radix_sort_u64((uint64_t *)view.buf, view.len / 8) < 0)
        qsort(view.buf, (size_t)(view.len / 8), 8, cmp_u64);  /* no memory for the radix sort */
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(index_lookup_doc,
"index_lookup(blocks, oids) -> array('Q')\n\n"
"OidIndex.get(oid, 0) of each 8-byte oid in `oids` (joined), read from the\n"
"index's blocks (OidIndex.blocks(): key oid >> 8 -> a dense block of 256\n"
"6-byte positions (bytearray, or a read-only memoryview), or a sparse one of n suffixes then n positions; see\n"
"index.py).  A block of any other length counts as absent.");

static PyObject *
index_lookup(PyObject *module, PyObject *args)
{
    PyObject *blocks, *result = NULL, *array_mod = NULL, *arr = NULL;
    Py_buffer oids;
    Py_ssize_t i, n;
    uint64_t *out = NULL;

    if (!PyArg_ParseTuple(args, "O!y*:index_lookup", &PyDict_Type, &blocks, &oids))
        return NULL;
    n = oids.len / 8;
    out = PyMem_Malloc(n ? n * 8 : 8);
    if (out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        const unsigned char *o = (const unsigned char *)oids.buf + 8 * i;
        uint64_t v = be64(o), pos = 0;
        unsigned s = (unsigned)(v & 0xff);
        PyObject *key = PyLong_FromUnsignedLongLong(v >> 8), *block;
        if (key == NULL)
            goto done;
        block = PyDict_GetItemWithError(blocks, key);
        Py_DECREF(key);
        if (block == NULL && PyErr_Occurred())
            goto done;
        if (block != NULL) {
            const unsigned char *b = NULL;
            Py_ssize_t len = 0;
            if (PyBytes_Check(block)) {
                b = (const unsigned char *)PyBytes_AS_STRING(block);
                len = PyBytes_GET_SIZE(block);
            } else if (PyByteArray_Check(block)) {
                b = (const unsigned char *)PyByteArray_AS_STRING(block);
                len = PyByteArray_GET_SIZE(block);
            } else if (PyMemoryView_Check(block)) {
                /* a dense block loaded from the index file: a view of its map */
                const Py_buffer *mv = PyMemoryView_GET_BUFFER(block);
                if (mv->itemsize == 1 && PyBuffer_IsContiguous(mv, 'C')) {
                    b = (const unsigned char *)mv->buf;
                    len = mv->len;
                }
            }
            if (len == 256 * 6) {
                b += 6 * s;
            } else if (len > 0 && len % 7 == 0) {
                Py_ssize_t count = len / 7;
                const unsigned char *hit = memchr(b, (int)s, (size_t)count);
                b = hit == NULL ? NULL : b + count + 6 * (hit - b);
            } else {
                b = NULL;
            }
            if (b != NULL)
                pos = ((uint64_t)b[0] << 40) | ((uint64_t)b[1] << 32) | ((uint64_t)b[2] << 24)
                      | ((uint64_t)b[3] << 16) | ((uint64_t)b[4] << 8) | b[5];
        }
        out[i] = pos;
    }
    array_mod = PyImport_ImportModule("array");
    if (array_mod == NULL)
        goto done;
    arr = PyObject_CallMethod(array_mod, "array", "s", "Q");
    if (arr == NULL)
        goto done;
    {
        PyObject *raw = PyBytes_FromStringAndSize((const char *)out, n * 8);
        PyObject *r;
        if (raw == NULL)
            goto done;
        r = PyObject_CallMethod(arr, "frombytes", "O", raw);
        Py_DECREF(raw);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    result = arr;
    arr = NULL;
done:
    PyMem_Free(out);
    Py_XDECREF(arr);
    Py_XDECREF(array_mod);
    PyBuffer_Release(&oids);
    return result;
}

/* ---------------------------------------------------------------------------------
 * OidMap: verify's oid -> position map for its walk (tools.common.OidMap; the
 * Python twin is tools.common.PyOidMap).  Open-addressing hash tables of
 * (oid as a native uint64, position) pairs, linear probing, position 0 marks
 * an empty slot (positions are 1 .. 2**48-1, as in OidIndex).  No deletion.
 * 21 to 43 bytes an entry, with no merges (an OidIndex fed in batches spends
 * its time merging them).
 */

#define OIDMAP_MAX_POS ((((uint64_t)1) << 48) - 1)
#define OIDMAP_PART_BITS 6
#define OIDMAP_PARTS (1 << OIDMAP_PART_BITS)
#define OIDMAP_MIN_CAP 16

/* The table is split in OIDMAP_PARTS parts by the top bits of the oid's hash, each
 * an open-addressing table that doubles on its own when 3/4 full: a doubling holds
 * the old and the new copy of one part only, not of the whole map. */
typedef struct {
    uint64_t *slots;   /* 2 * cap: oid, position */
    Py_ssize_t cap;    /* a power of two */
    Py_ssize_t count;
    int shift;         /* 64 - log2(cap) */
} OidMapPart;

typedef struct {
    PyObject_HEAD
    Py_ssize_t count;
    OidMapPart parts[OIDMAP_PARTS];
} OidMapObject;

static inline uint64_t
oidmap_hash(uint64_t oid)
{
    return oid * UINT64_C(0x9E3779B97F4A7C15);
}

static inline OidMapPart *
oidmap_part(OidMapObject *m, uint64_t h)
{
    return &m->parts[h >> (64 - OIDMAP_PART_BITS)];
}

static inline Py_ssize_t
oidmap_home(const OidMapPart *p, uint64_t h)
{
    return (Py_ssize_t)((h << OIDMAP_PART_BITS) >> p->shift);
}

/* The slot of `oid` in its part: where it is, or the empty slot where it would go. */
static inline Py_ssize_t
oidmap_find(const OidMapPart *p, uint64_t oid, uint64_t h)
{
    Py_ssize_t mask = p->cap - 1, i = oidmap_home(p, h);
    const uint64_t *s = p->slots;
    while (s[2 * i + 1] != 0 && s[2 * i] != oid)
        i = (i + 1) & mask;
    return i;
}

static int
oidmap_resize(OidMapPart *p, Py_ssize_t cap)
{
    uint64_t *old = p->slots, *slots;
    Py_ssize_t oldcap = p->cap, i;
    int bits = 0;

    if ((size_t)cap > PY_SSIZE_T_MAX / 16) {
        PyErr_NoMemory();
        return -1;
    }
    slots = PyMem_Calloc((size_t)cap, 16);
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    while (((Py_ssize_t)1 << bits) < cap)
        bits++;
    p->slots = slots;
    p->cap = cap;
    p->shift = 64 - bits;
    for (i = 0; i < oldcap; i++) {
        if (old[2 * i + 1] != 0) {
            Py_ssize_t j = oidmap_find(p, old[2 * i], oidmap_hash(old[2 * i]));
            slots[2 * j] = old[2 * i];
            slots[2 * j + 1] = old[2 * i + 1];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Set oid -> pos (pos != 0); -1 with MemoryError set when its part cannot grow. */
static inline int
oidmap_set(OidMapObject *m, uint64_t oid, uint64_t pos)
{
    uint64_t h = oidmap_hash(oid);
    OidMapPart *p = oidmap_part(m, h);
    Py_ssize_t i = oidmap_find(p, oid, h);
    if (p->slots[2 * i + 1] == 0) {
        if ((p->count + 1) * 4 > p->cap * 3) {
            if (oidmap_resize(p, p->cap * 2) < 0)
                return -1;
            i = oidmap_find(p, oid, h);
        }
        p->count++;
        m->count++;
        p->slots[2 * i] = oid;
    }
    p->slots[2 * i + 1] = pos;
    return 0;
}

static inline uint64_t
oidmap_get(OidMapObject *m, uint64_t oid)
{
    uint64_t h = oidmap_hash(oid);
    OidMapPart *p = oidmap_part(m, h);
    return p->slots[2 * oidmap_find(p, oid, h) + 1];
}

static inline void
oidmap_prefetch(OidMapObject *m, uint64_t oid)
{
#if defined(__GNUC__)
    uint64_t h = oidmap_hash(oid);
    OidMapPart *p = oidmap_part(m, h);
    __builtin_prefetch(p->slots + 2 * oidmap_home(p, h));
#else
    (void)m;
    (void)oid;
#endif
}

static PyObject *
oidmap_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    OidMapObject *m;
    int k;
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "OidMap() takes no arguments");
        return NULL;
    }
    m = (OidMapObject *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->count = 0;
    for (k = 0; k < OIDMAP_PARTS; k++) {
        m->parts[k].slots = NULL;
        m->parts[k].cap = 0;
        m->parts[k].count = 0;
    }
    for (k = 0; k < OIDMAP_PARTS; k++) {
        if (oidmap_resize(&m->parts[k], OIDMAP_MIN_CAP) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return (PyObject *)m;
}

static void
oidmap_dealloc(OidMapObject *m)
{
    int k;
    for (k = 0; k < OIDMAP_PARTS; k++)
        PyMem_Free(m->parts[k].slots);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

/* A new array('Q') of n zeros, and a pointer to its items in *items (no copy on the way:
 * array('Q', 8 zero bytes) * n); NULL with an exception set on failure.  The pointer is
 * good while the array is not resized. */
static PyObject *
u64_array(Py_ssize_t n, uint64_t **items)
{
    PyObject *array_mod, *one, *zero, *arr;
    Py_buffer view;
    array_mod = PyImport_ImportModule("array");
    if (array_mod == NULL)
        return NULL;
    zero = PyBytes_FromStringAndSize("\0\0\0\0\0\0\0\0", 8);
    one = zero == NULL ? NULL : PyObject_CallMethod(array_mod, "array", "sO", "Q", zero);
    Py_XDECREF(zero);
    Py_DECREF(array_mod);
    if (one == NULL)
        return NULL;
    arr = PySequence_Repeat(one, n);
    Py_DECREF(one);
    if (arr == NULL)
        return NULL;
    if (PyObject_GetBuffer(arr, &view, PyBUF_WRITABLE) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    *items = (uint64_t *)view.buf;
    PyBuffer_Release(&view);
    return arr;
}

/* The oid `key` as a native uint64: 1, or 0 when it is not 8 bytes (-1: error set). */
static int
oidmap_key(PyObject *key, uint64_t *oid)
{
    if (!PyBytes_Check(key))
        return 0;
    if (PyBytes_GET_SIZE(key) != 8)
        return 0;
    *oid = be64((const unsigned char *)PyBytes_AS_STRING(key));
    return 1;
}

static Py_ssize_t
oidmap_len(OidMapObject *m)
{
    return m->count;
}

static int
oidmap_contains(OidMapObject *m, PyObject *key)
{
    uint64_t oid;
    if (!oidmap_key(key, &oid))
        return 0;
    return oidmap_get(m, oid) != 0;
}

PyDoc_STRVAR(oidmap_get_doc, "get(oid, default=None): the position of `oid`, or `default`.");

static PyObject *
oidmap_get_method(OidMapObject *m, PyObject *args)
{
    PyObject *key, *dflt = Py_None;
    uint64_t oid, pos = 0;
    if (!PyArg_ParseTuple(args, "O|O:get", &key, &dflt))
        return NULL;
    if (oidmap_key(key, &oid))
        pos = oidmap_get(m, oid);
    if (pos == 0) {
        Py_INCREF(dflt);
        return dflt;
    }
    return PyLong_FromUnsignedLongLong(pos);
}

PyDoc_STRVAR(oidmap_swap_table_doc,
"swap_table(table) -> array('Q')\n\n"
"`table` is oid-table entries (16 bytes each: an 8-byte oid, its 8-byte\n"
"big-endian position).  Returns each entry's oid's position before the call\n"
"(0 if absent; all looked up before any is set), then sets the entries in\n"
"order (where an oid repeats, the last wins).  ValueError (nothing changed)\n"
"for a position not in 1..2**48-1.");

static PyObject *
oidmap_swap_table(OidMapObject *m, PyObject *arg)
{
    Py_buffer table;
    Py_ssize_t i, n;
    const unsigned char *t;
    uint64_t *out = NULL;
    PyObject *result = NULL;

    if (PyObject_GetBuffer(arg, &table, PyBUF_SIMPLE) < 0)
        return NULL;
    if (table.len % 16) {
        PyErr_SetString(PyExc_ValueError, "an oid table is made of 16-byte entries");
        goto done;
    }
    n = table.len / 16;
    t = (const unsigned char *)table.buf;
    for (i = 0; i < n; i++) {
        uint64_t pos = be64(t + 16 * i + 8);
        if (pos == 0 || pos > OIDMAP_MAX_POS) {
            PyErr_Format(PyExc_ValueError, "position %llu is not in 1..2**48-1",
                         (unsigned long long)pos);
            goto done;
        }
    }
    result = u64_array(n, &out);
    if (result == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        if (i + 8 < n)
            oidmap_prefetch(m, be64(t + 16 * (i + 8)));
        out[i] = oidmap_get(m, be64(t + 16 * i));
    }
    for (i = 0; i < n; i++) {
        if (oidmap_set(m, be64(t + 16 * i), be64(t + 16 * i + 8)) < 0) {
            Py_CLEAR(result);
            break;
        }
    }
done:
    PyBuffer_Release(&table);
    return result;
}

PyDoc_STRVAR(oidmap_update_doc,
"update(entries: dict[bytes, int]) -> None\n\n"
"Set every oid -> position of `entries`.  ValueError (nothing changed) for an\n"
"oid that is not 8 bytes or a position not in 1..2**48-1.");

static PyObject *
oidmap_update(OidMapObject *m, PyObject *arg)
{
    Py_ssize_t it = 0;
    PyObject *key, *value;
    uint64_t oid;

    if (!PyDict_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "OidMap.update() needs a dict");
        return NULL;
    }
    while (PyDict_Next(arg, &it, &key, &value)) {
        unsigned long long pos;
        if (!oidmap_key(key, &oid)) {
            PyErr_Format(PyExc_ValueError, "an oid is 8 bytes, not %R", key);
            return NULL;
        }
        pos = PyLong_Check(value) ? PyLong_AsUnsignedLongLong(value) : 0;
        if (pos == (unsigned long long)-1 && PyErr_Occurred())
            PyErr_Clear();
        if (pos == 0 || pos == (unsigned long long)-1 || pos > OIDMAP_MAX_POS) {
            PyErr_Format(PyExc_ValueError, "position %R is not in 1..2**48-1", value);
            return NULL;
        }
    }
    it = 0;
    while (PyDict_Next(arg, &it, &key, &value)) {
        oidmap_key(key, &oid);
        if (oidmap_set(m, oid, (uint64_t)PyLong_AsUnsignedLongLong(value)) < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(oidmap_lookup_doc,
"lookup(oids) -> array('Q')\n\n"
"The position of each 8-byte oid of `oids` (joined), 0 for an absent one.");

static PyObject *
oidmap_lookup(OidMapObject *m, PyObject *arg)
{
    Py_buffer oids;
    Py_ssize_t i, n;
    uint64_t *out;
    PyObject *result = NULL;
    const unsigned char *o;

    if (PyObject_GetBuffer(arg, &oids, PyBUF_SIMPLE) < 0)
        return NULL;
    n = oids.len / 8;
    o = (const unsigned char *)oids.buf;
    result = u64_array(n, &out);
    if (result != NULL) {
        for (i = 0; i < n; i++) {
            if (i + 8 < n)
                oidmap_prefetch(m, be64(o + 8 * (i + 8)));
            out[i] = oidmap_get(m, be64(o + 8 * i));
        }
    }
    PyBuffer_Release(&oids);
    return result;
}

PyDoc_STRVAR(oidmap_positions_doc,
"positions() -> array('Q')\n\nEvery entry's position, in no particular order.");

static PyObject *
oidmap_positions(OidMapObject *m, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t i, k = 0;
    uint64_t *out;
    PyObject *result = u64_array(m->count, &out);
    if (result == NULL)
        return NULL;
    int part;
    for (part = 0; part < OIDMAP_PARTS; part++) {
        const OidMapPart *p = &m->parts[part];
        for (i = 0; i < p->cap; i++)
            if (p->slots[2 * i + 1] != 0)
                out[k++] = p->slots[2 * i + 1];
    }
    return result;
}

static int
cmp_pair(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

PyDoc_STRVAR(oidmap_table_doc,
"table() -> bytes\n\n"
"Every entry as an oid-table entry (8-byte oid, 8-byte big-endian position),\n"
"in ascending oid order.");

static PyObject *
oidmap_table(OidMapObject *m, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t i, k = 0;
    uint64_t *pairs = PyMem_Malloc(m->count ? (size_t)m->count * 16 : 16);
    PyObject *result;
    unsigned char *dst;
    if (pairs == NULL)
        return PyErr_NoMemory();
    int part;
    for (part = 0; part < OIDMAP_PARTS; part++) {
        const OidMapPart *p = &m->parts[part];
        for (i = 0; i < p->cap; i++) {
            if (p->slots[2 * i + 1] != 0) {
                pairs[2 * k] = p->slots[2 * i];
                pairs[2 * k + 1] = p->slots[2 * i + 1];
                k++;
            }
        }
    }
    qsort(pairs, (size_t)k, 16, cmp_pair);
    result = PyBytes_FromStringAndSize(NULL, k * 16);
    if (result != NULL) {
        dst = (unsigned char *)PyBytes_AS_STRING(result);
        for (i = 0; i < k; i++) {
            put64(dst + 16 * i, pairs[2 * i]);
            put64(dst + 16 * i + 8, pairs[2 * i + 1]);
        }
    }
    PyMem_Free(pairs);
    return result;
}


PyDoc_STRVAR(oidmap_same_as_doc,
"same_as(index) -> bool\n\n"
"Whether this map holds exactly the entries of OidIndex `index` (read through\n"
"index.blocks(), the layout index.py documents, and len(index)); a block of\n"
"another shape makes the answer False.");

static PyObject *
oidmap_same_as(OidMapObject *m, PyObject *index)
{
    PyObject *blocks, *key, *block;
    Py_ssize_t it = 0, count, seen = 0;
    int same = 1;

    count = PyObject_Length(index);
    if (count < 0)
        return NULL;
    if (count != m->count)
        Py_RETURN_FALSE;
    blocks = PyObject_CallMethod(index, "blocks", NULL);
    if (blocks == NULL)
        return NULL;
    if (!PyDict_Check(blocks)) {
        Py_DECREF(blocks);
        PyErr_SetString(PyExc_TypeError, "index.blocks() is not a dict");
        return NULL;
    }
    while (same && PyDict_Next(blocks, &it, &key, &block)) {
        const unsigned char *b;
        Py_ssize_t len, j;
        uint64_t base;
        if (PyBytes_Check(block)) {
            b = (const unsigned char *)PyBytes_AS_STRING(block);
            len = PyBytes_GET_SIZE(block);
        } else if (PyByteArray_Check(block)) {
            b = (const unsigned char *)PyByteArray_AS_STRING(block);
            len = PyByteArray_GET_SIZE(block);
        } else {
            same = 0;
            break;
        }
        base = PyLong_AsUnsignedLongLong(key);
        if (base == (uint64_t)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            same = 0;
            break;
        }
        if (base >> 56) {
            same = 0;
            break;
        }
        base <<= 8;
        if (len == 256 * 6) {
            for (j = 0; j < 256 && same; j++) {
                const unsigned char *q = b + 6 * j;
                uint64_t pos = ((uint64_t)q[0] << 40) | ((uint64_t)q[1] << 32) | ((uint64_t)q[2] << 24)
                               | ((uint64_t)q[3] << 16) | ((uint64_t)q[4] << 8) | q[5];
                if (pos) {
                    seen++;
                    same = oidmap_get(m, base | (uint64_t)j) == pos;
                }
            }
        } else if (len > 0 && len % 7 == 0) {
            Py_ssize_t c = len / 7;
            for (j = 0; j < c && same; j++) {
                const unsigned char *q = b + c + 6 * j;
                uint64_t pos = ((uint64_t)q[0] << 40) | ((uint64_t)q[1] << 32) | ((uint64_t)q[2] << 24)
                               | ((uint64_t)q[3] << 16) | ((uint64_t)q[4] << 8) | q[5];
                seen++;
                same = pos != 0 && oidmap_get(m, base | b[j]) == pos;
            }
        } else {
            same = 0;
        }
    }
    Py_DECREF(blocks);
    if (same && seen != count)
        same = 0;
    return PyBool_FromLong(same);
}

static PyMethodDef oidmap_methods[] = {
    {"get", (PyCFunction)oidmap_get_method, METH_VARARGS, oidmap_get_doc},
    {"swap_table", (PyCFunction)oidmap_swap_table, METH_O, oidmap_swap_table_doc},
    {"update", (PyCFunction)oidmap_update, METH_O, oidmap_update_doc},
    {"lookup", (PyCFunction)oidmap_lookup, METH_O, oidmap_lookup_doc},
    {"positions", (PyCFunction)oidmap_positions, METH_NOARGS, oidmap_positions_doc},
    {"table", (PyCFunction)oidmap_table, METH_NOARGS, oidmap_table_doc},
    {"same_as", (PyCFunction)oidmap_same_as, METH_O, oidmap_same_as_doc},
    {NULL, NULL, 0, NULL}
};

static PySequenceMethods oidmap_as_sequence = {
    .sq_length = (lenfunc)oidmap_len,
    .sq_contains = (objobjproc)oidmap_contains,
};

PyDoc_STRVAR(oidmap_doc,
"OidMap(): verify's oid -> position map (8-byte oids, positions 1..2**48-1),\n"
"an open-addressing hash table in C; its Python twin is tools.common.PyOidMap.");

static PyTypeObject OidMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "refstorage._refscan.OidMap",
    .tp_basicsize = sizeof(OidMapObject),
    .tp_dealloc = (destructor)oidmap_dealloc,
    .tp_as_sequence = &oidmap_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = oidmap_doc,
    .tp_methods = oidmap_methods,
    .tp_new = oidmap_new,
};

static PyMethodDef methods[] = {
    {"index_lookup", index_lookup, METH_VARARGS, index_lookup_doc},
    {"sort_positions", sort_positions, METH_O, sort_positions_doc},
    {"scan", scan, METH_O, scan_doc},
    {"scan_many", scan_many, METH_O, scan_many_doc},
    {"relocate", relocate, METH_VARARGS, relocate_doc},
    {"count_kept", count_kept, METH_VARARGS, count_kept_doc},
    {"dense_check", dense_check, METH_VARARGS, dense_check_doc},
    {"gc_refs", gc_refs, METH_VARARGS, gc_refs_doc},
    {"check_records", check_records, METH_VARARGS, check_records_doc},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "refstorage._refscan",
    "Persistent references of ZODB record pickles, found by walking opcodes in C.",
    -1, methods
};

PyMODINIT_FUNC
PyInit__refscan(void)
{
    PyObject *mod;
    if (PyType_Ready(&OidMapType) < 0)
        return NULL;
    mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    Py_INCREF(&OidMapType);
    if (PyModule_AddObject(mod, "OidMap", (PyObject *)&OidMapType) < 0) {
        Py_DECREF(&OidMapType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
