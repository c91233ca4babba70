/*
 * Batches of packets between Python and the engine (see _engine.c): phase 1 copies the packets into
 * one C arena and allocates each output bytes object at its largest size, with the GIL held; phase 2
 * (in _engine.c, without the GIL) fills the outputs, which no other thread can see yet; phase 3
 * trims each output to its length or replaces it with its interned drop-reason string.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "engine.h"
#include "pyglue.h"

void batch_free(batch *b)
{
    for (Py_ssize_t i = 0; b->slots != NULL && i < b->n; i++)
        Py_XDECREF(b->slots[i].obj);
    PyMem_Free(b->slots);
    PyMem_RawFree(b->arena);
    b->slots = NULL;
    b->arena = NULL;
}

static int batch_copy_in(batch *b, PyObject *fast)
{
    Py_buffer *views = PyMem_Calloc((size_t)b->n + 1, sizeof(Py_buffer));
    Py_ssize_t got = 0;
    size_t total = 0;
    int rc = -1;
    if (views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (; got < b->n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &views[got], PyBUF_SIMPLE) != 0) {
            PyErr_Format(PyExc_TypeError, "packets[%zd] is not a bytes-like object", got);
            goto out;
        }
        slot *s = &b->slots[got];
        s->orig = (size_t)views[got].len;
        s->len = s->orig < IPS_MAX_DATAGRAM ? s->orig : IPS_MAX_DATAGRAM;
        s->in_off = total;
        total += s->len;
    }
    b->arena = PyMem_RawMalloc(total ? total : 1);
    if (b->arena == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < b->n; i++)
        memcpy(b->arena + b->slots[i].in_off, views[i].buf, b->slots[i].len);
    rc = 0;
out:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    return rc;
}

/* Phase 1 (GIL held): copy the packets in, allocate each output at len + headroom bytes. */
int batch_init(batch *b, PyObject *packets, size_t headroom)
{
    memset(b, 0, sizeof(*b));
    PyObject *fast = PySequence_Fast(packets, "packets must be a list or tuple of bytes-like objects");
    if (fast == NULL)
        return -1;
    b->n = PySequence_Fast_GET_SIZE(fast);
    b->slots = PyMem_Calloc((size_t)b->n + 1, sizeof(slot));
    if (b->slots == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    int rc = batch_copy_in(b, fast);
    Py_DECREF(fast);
    for (Py_ssize_t i = 0; rc == 0 && i < b->n; i++) {
        slot *s = &b->slots[i];
        s->cap = s->len + headroom;
        if (s->cap < 20)
            continue; /* no IP packet fits: it is refused before anything is written */
        s->obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)s->cap);
        if (s->obj == NULL)
            rc = -1;
        else
            s->out = (uint8_t *)PyBytes_AS_STRING(s->obj);
    }
    if (rc != 0)
        batch_free(b);
    return rc;
}

/* Phase 3 (GIL held): the result list; consumes the batch. */
PyObject *batch_results(batch *b)
{
    PyObject *list = PyList_New(b->n);
    for (Py_ssize_t i = 0; list != NULL && i < b->n; i++) {
        slot *s = &b->slots[i];
        PyObject *item;
        if (s->reason == IPS_OK && s->obj != NULL) {
            item = s->obj;
            s->obj = NULL;
            if (s->out_len != s->cap && _PyBytes_Resize(&item, (Py_ssize_t)s->out_len) != 0) {
                Py_CLEAR(list);
                break;
            }
        } else {
            item = Py_NewRef(ips_reason_str[s->reason == IPS_OK ? IPS_R_CRYPTO_ERROR : s->reason]);
        }
        PyList_SET_ITEM(list, i, item);
    }
    batch_free(b);
    return list;
}

