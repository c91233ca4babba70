/*
 * The engine object shared by the CPython type (_engine.c), the forwarder's Python methods (pyfwd.c)
 * and the forwarder's threads (fwd*.c): the SA table and the engine-wide counters.
 *
 * Locking is the one engine.h describes: the table's read-write lock around every use of an SA
 * pointer (the forwarder's threads hold it for a whole batch run, so remove() cannot free an SA
 * under them), the SA's own mutex inside it, and the counters' and event queue's mutexes innermost.
 * The forwarder adds its own locks (fwd.h), none of which is ever held while one of these is taken.
 */
#ifndef IPSECSTACK_NATIVE_ENGINE_OBJ_H
#define IPSECSTACK_NATIVE_ENGINE_OBJ_H

#include <Python.h>

#include "engine.h"

struct ips_fwd;

typedef struct EngineObject {
    PyObject_HEAD
    pthread_rwlock_t table_lock; /* the buckets and every chain */
    ips_sa **buckets;
    size_t nbuckets, count;
    ips_events events;
    pthread_mutex_t stats_lock; /* the engine-wide counters below */
    uint64_t drops[IPS_R_COUNT];
    uint64_t in_packets, out_packets;
    int ready;
    struct ips_fwd *fwd; /* the forwarder (fwd.h), NULL until the first fwd_start */
    int fwd_users;       /* Python calls using fwd with the GIL released (changed with the GIL held) */
} EngineObject;

/* ---- table.c (callers hold table_lock, read or write as the name says) ---------------------- */

ips_sa *ips_table_find(EngineObject *e, uint8_t dir, uint32_t spi);
int ips_table_insert(EngineObject *e, ips_sa *sa);     /* write lock; -1: the (dir, SPI) is taken */
ips_sa *ips_table_unlink(EngineObject *e, uint8_t dir, uint32_t spi); /* write lock */

/* Add a batch's drops and its packet count to the engine-wide counters (takes stats_lock). */
void ips_engine_count(EngineObject *e, const uint64_t *drops, uint64_t n, int outbound);

/* ---- pyfwd.c: the forwarder's methods of Engine ---------------------------------------------- */

PyObject *ips_py_fwd_start(EngineObject *self, PyObject *args, PyObject *kwargs);
PyObject *ips_py_fwd_stop(EngineObject *self, PyObject *unused);
PyObject *ips_py_learn_out(EngineObject *self, PyObject *args, PyObject *kwargs);
PyObject *ips_py_learn_in(EngineObject *self, PyObject *args);
PyObject *ips_py_flush(EngineObject *self, PyObject *unused);
PyObject *ips_py_take_punts(EngineObject *self, PyObject *args, PyObject *kwargs);
PyObject *ips_py_fwd_stats(EngineObject *self, PyObject *unused);
void ips_fwd_dealloc(EngineObject *self); /* stop and free the forwarder, with the GIL held */

/* ---- pynfq.c: the NFQUEUE threads' methods of Engine, and the codec's module functions --------- */

PyObject *ips_py_nfq_start(EngineObject *self, PyObject *args, PyObject *kwargs);
PyObject *ips_py_nfq_verdict(EngineObject *self, PyObject *args, PyObject *kwargs);
PyObject *ips_py_nfq_parse(PyObject *module, PyObject *data);
PyObject *ips_py_tcp_merge(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *ips_py_codel_trace(PyObject *module, PyObject *args);
PyObject *ips_py_nfq_build_verdict(PyObject *module, PyObject *args);
PyObject *ips_py_nfq_config_copy(PyObject *module, PyObject *args);
PyObject *ips_py_nfq_config_flags(PyObject *module, PyObject *args);
PyObject *ips_py_inet_sum(PyObject *module, PyObject *args);
PyObject *ips_py_nfq_send(EngineObject *self, PyObject *arg);

#endif
