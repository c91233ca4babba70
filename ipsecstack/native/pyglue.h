/*
 * CPython-facing helpers of the native engine, shared by _engine.c, params.c and batch.c. They are
 * called with the GIL held (batch_* phases 1 and 3, argument parsing); nothing here takes a lock.
 */
#ifndef IPSECSTACK_NATIVE_PYGLUE_H
#define IPSECSTACK_NATIVE_PYGLUE_H

#include <Python.h>

#include "engine.h"

/* the drop reasons as interned str objects, indexed by ips_reason (_engine.c creates them) */
extern PyObject *ips_reason_str[IPS_R_COUNT];

/* ---- params.c ------------------------------------------------------------------------------- */

typedef struct {
    ips_sa_params p;
    const ips_suite *suite;
    Py_buffer key;   /* released by the caller after a successful parse */
    PyObject *seen;  /* borrowed: replay_seen, or Py_None */
} ips_install_args;

int ips_parse_install(PyObject *args, PyObject *kwargs, ips_install_args *a);
int ips_mark_seen(ips_replay *w, PyObject *seen);
int ips_get_dir(const char *s, uint8_t *dir);
int ips_get_spi(PyObject *o, uint32_t *spi);

/* ---- pyfwd.c -------------------------------------------------------------------------------- */

/* The virtio_net_hdr size of a TUN opened with IFF_VNET_HDR (10 or 12; another packet fd, a socketpair
 * in the tests, is taken to carry 10 bytes); -1 with an exception when the TUN has none. */
int ips_vnet_len_of(int fd);

/* ---- batch.c -------------------------------------------------------------------------------- */

typedef struct {
    size_t in_off, len, orig; /* copied bytes at arena + in_off, of an object orig bytes long */
    PyObject *obj;            /* the output bytes object (len + headroom bytes), or NULL */
    uint8_t *out;
    size_t cap, out_len;
    ips_reason reason;
} slot;

typedef struct {
    Py_ssize_t n;
    slot *slots;
    uint8_t *arena;
} batch;

int batch_init(batch *b, PyObject *packets, size_t headroom);
PyObject *batch_results(batch *b);
void batch_free(batch *b);

#endif
