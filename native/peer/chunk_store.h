/*
 * The chunk store's insides, shared by its three files:
 *
 *   chunk_slots.c  one slot file: slot headers, writing, reading, freeing
 *   chunk_dir.c    a namespace's directory: read at open (slot files
 *                  scanned, old one-file-per-chunk layout converted), its
 *                  owner file, removal
 *   chunk_store.c  the namespace table, owners, capacity, locking and the
 *                  chunk_store_* calls of peer.h
 *
 * On disk, under the store's root:
 *
 *   <ns>/owner         the owning member's name (absent: a namespace written
 *                      before owners were recorded; its first user adopts it)
 *   <ns>/slots-<len>   every chunk of blob length <len> in the namespace: an
 *                      array of slots of slot_stride(len) bytes, each a
 *                      40-byte header and the blob (padded to 8 bytes)
 *   .trash-<n>         a namespace being removed (finished at the next open)
 *
 * Slot header, little-endian: u32 magic "OMCS", u32 crc32c of the header
 * (with this field zero) and the blob, u64 key, u64 version, u64 seq (a
 * store-wide write sequence number), u32 blob length, u32 zero. A slot
 * whose magic or crc does not check is free: a torn write is never read
 * back as data. A key in two valid slots (a crash between writing its new
 * slot and freeing the old one) is the one of higher (version, seq).
 *
 * A put never overwrites the key's live slot: it writes a free slot (or
 * appends one), fdatasyncs the file when the store syncs (once per file
 * per batch), then points the index at it and frees the old slot. A slot
 * freed by a put only has its header zeroed (the next put of that length
 * reuses it); one freed by DELETE has a hole punched over it (fallocate) so
 * the disk space comes back. A delete fdatasyncs every file of the
 * namespace with unsynced frees first, so a deleted key cannot come back
 * from an older slot after a crash.
 *
 * Locking: the store's rwlock guards its namespace table only; each
 * namespace has its own rwlock (reads share it, so GETs of one namespace
 * read the disk in parallel); acct guards the capacity counters. Order:
 * store lock, then a namespace's, then acct. A put holds its namespace's
 * lock to plan and to install, not while it writes and syncs.
 */
#ifndef OMEGA_CHUNK_STORE_H
#define OMEGA_CHUNK_STORE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "keytab.h"

#define SLOT_HEAD 40
#define SLOT_MAGIC 0x53434D4Fu /* "OMCS" read as a little-endian u32 */
#define OWNER_FILE "owner"

struct slot_head {
    uint64_t key;
    uint64_t version;
    uint64_t seq;
    uint32_t len;
};

struct slotfile {
    uint32_t len;       /* the blob length of every slot */
    uint64_t stride;    /* bytes per slot */
    int fd;
    uint32_t nslots;    /* slots below the end of the file */
    uint64_t *busy;     /* a bit per slot: live, or being written */
    size_t busywords;
    uint32_t *free;     /* slots below nslots that are not busy, reused first */
    size_t nfree, freecap;
    int unsynced;       /* slots freed since the last fdatasync of a delete */
    struct slotmap *map; /* mappings of the file, for slot_read and slot_write */
    uint64_t *filled;   /* a bit per slot whose bytes the file holds (no hole) */
    size_t filledwords;
};

/* Where slot_write writes a slot, copied from its slotfile under the lock
 * (the files array may move while the slot is written). */
struct slot_dest {
    int fd;
    uint64_t stride;
    struct slotmap *map;
    int filled;          /* no hole under the slot: it may go through the mapping */
};

/* An index entry: where a key's live slot is. */
struct chunk {
    struct keytab_head h; /* key, version */
    uint64_t seq;
    uint32_t file;        /* index into cns.files */
    uint32_t slot;
};

/* A file index by blob length (cns.bylen). */
struct bylen {
    struct keytab_head h; /* key: the blob length */
    uint32_t file;
};

struct cns {
    char *name;
    char *owner;            /* NULL: not recorded (a legacy namespace) */
    pthread_rwlock_t lock;  /* everything below but refs */
    int dirfd;
    struct keytab index;    /* key -> struct chunk */
    struct keytab bylen;    /* blob length -> struct bylen */
    struct slotfile *files;
    size_t nfiles, filecap;
    uint64_t bytes;         /* live blob bytes */
    unsigned pending;       /* puts between their plan and their install */
    int dead;               /* out of the table; its directory is trash */
    int refs;               /* atomic; the table holds one */
};

struct chunk_store {
    pthread_rwlock_t lock;  /* the namespace table */
    pthread_mutex_t acct;   /* used, reserved, count */
    int rootfd;             /* flock'ed: one store per root */
    int fsync;
    uint64_t capacity;
    uint64_t used;          /* live blob bytes */
    uint64_t reserved;      /* growth of puts still writing */
    uint64_t count;
    uint64_t seq;           /* atomic: the last write sequence number given */
    uint64_t trash;         /* atomic: the last trash directory number */
    struct cns **ns;
    size_t nns, nscap;
};

/* chunk_slots.c. Callers hold the namespace's write lock unless stated. */

uint64_t slot_stride(uint32_t len);
/* The file of blob length len (made when create and missing; the
 * directory is fsynced after a file is made when fsync). 0, -ENOENT (absent
 * and not create), or a negative errno. */
int slotfile_get(struct cns *t, uint32_t len, int create, int fsync, uint32_t *file);
/* Add an open slot file of nslots slots (none busy yet); 0 or -errno. */
int slotfile_add(struct cns *t, uint32_t len, int fd, uint32_t nslots, uint32_t *file);
void slotfile_close(struct slotfile *f);
/* Mark slot busy (it must be below nslots). */
int slot_mark(struct slotfile *f, uint32_t slot);
int slot_is_busy(const struct slotfile *f, uint32_t slot);
/* Rebuild the free list from the busy bits, dropping free slots at the end
 * of the file (it is truncated). */
int slotfile_settle(struct slotfile *f);
/* A free slot (a freed one, else one appended), marked busy. */
int slot_take(struct slotfile *f, uint32_t *slot);
/* Free a slot nobody reads: its header is zeroed (superseded or never
 * installed). The slot is freed even when the write fails. */
int slot_forget(struct slotfile *f, uint32_t slot);
/* Give back a slot taken but never written. */
void slot_untake(struct slotfile *f, uint32_t slot);
/* At open, before slotfile_settle: zero the header of a slot that lost to
 * another of its key, and unmark it. */
int slot_clear(struct slotfile *f, uint32_t slot);
/* Free a deleted chunk's slot: a hole is punched over it (and over the
 * free neighbours' share of the blocks it spans); where holes cannot be
 * punched its header is zeroed. The slot is freed even on failure. */
int slot_punch(struct slotfile *f, uint32_t slot);
/* Where slot_write is to write slot of f (under the lock). */
void slot_dest(const struct slotfile *f, uint32_t slot, struct slot_dest *d);
/* Write a slot taken by slot_take to d; needs no lock (the slot is the
 * writer's alone). */
int slot_write(const struct slot_dest *d, uint32_t slot, const struct slot_head *h,
               const uint8_t *blob);
/* Note (under the lock) that slot_write wrote slot: its bytes are in the file. */
void slot_fill(struct slotfile *f, uint32_t slot);
/* Read e's blob into blob after checking the slot's header and crc against
 * e: 0, -EBADMSG or -errno. Under the namespace's read lock. */
int slot_read(const struct slotfile *f, uint32_t slot, const struct chunk *e, uint8_t *blob);
/* Whether raw (SLOT_HEAD + len bytes) is a valid slot of blob length len;
 * its header into h. */
int slot_parse(const uint8_t *raw, uint32_t len, struct slot_head *h);

/* chunk_dir.c */

/* A read-write lock that lets a waiting writer in before new readers (the
 * default lets a stream of GETs starve every put). Never taken twice for
 * reading by one thread. 0 or -errno. */
int chunk_rwlock_init(pthread_rwlock_t *lock);

/* Open (making it when create) namespace directory name under the root and
 * read it: slot files scanned, old-layout files converted, the owner file
 * read. *out: the namespace (refs 1, maybe empty). 0 or -errno with a
 * message in err. */
int chunk_dir_load(struct chunk_store *s, const char *name, int create, struct cns **out,
                   char *err, size_t errlen);
void cns_free(struct cns *t);
/* Record owner in t's owner file (temporary name, fsync, rename). */
int chunk_dir_set_owner(struct chunk_store *s, struct cns *t, const char *owner);
/* Rename directory name under the root to a fresh trash name (fsync of the
 * root when the store syncs); that name into trash. */
int chunk_dir_to_trash(struct chunk_store *s, const char *name, char *trash, size_t len);
/* Remove a directory under the root and the files in it (one level). */
void chunk_dir_remove(int rootfd, const char *name);

#endif
