package state

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"maps"
	"math"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/formation"
)

// The index cache is a copy of the embedded store's in-memory index (the
// operations' opIndex, the mappings and the exports) in a file, with the
// identity of the bucket's stream and the last stream sequence it
// reflects, so that a start reads only the records written after that
// sequence instead of every record. It is a cache: the records stay the
// only source, and a start in any doubt about the file reads every record
// as without one (kvCacheDoubt).
const (
	kvCacheMagic = "volumed kv index cache\n"
	// kvCacheVersion is raised whenever the file's layout changes, and
	// whenever what the index derives from a record does (its fields,
	// opScore, completedAt, Duration, VM): a file of another version is
	// not read, so a release never loads values another one derived.
	// Version 4 holds the delta of the operation index and names its
	// base file (writeBaseFile).
	kvCacheVersion = 4
	// kvCacheVersionV3 is the version before it: the base inside the
	// cache file, read from it (and written as version 4, with a base
	// file, at once: KV.New).
	kvCacheVersionV3 = 3
	// kvCacheVersionV2 is the version before that: the slots as varints,
	// read into the heap (and written as version 4 at the next write,
	// with a base file when a new base is due).
	kvCacheVersionV2 = 2
	// kvCacheEvery is how often a running store asks whether to write
	// its cache (cacheDue); it is also written at Close.
	kvCacheEvery = 10 * time.Minute
	// kvCacheMaxAge is the oldest cache a start uses. A delete leaves a
	// marker that expires after kvMarkerTTL: a cache older than that
	// could miss a delete whose marker is gone. (A cache is dated no later
	// than the first message its watcher had not read: saveCache.) Half
	// of it is a margin for the clocks: the age is the host's, a marker's
	// life the server's.
	kvCacheMaxAge = kvMarkerTTL / 2
	// kvCacheSealPrefix begins the bucket key of a cache file's seal: a
	// message saveCache writes with each file, past the sequence the file
	// reflects, whose sequence and nonce the file holds. Only the history
	// the file was written from holds it there: a stream restored from an
	// earlier backup (with the same creation time) and written past the
	// file's sequence since does not. The key is random, made by the
	// first start without a usable file and kept in the file
	// (newSealKey): every process sharing the bucket, each cluster
	// member, has its own, and its new seal replaces its last one. A seal
	// expires after kvCacheSealTTL, by when the file is too old anyway, so
	// the seals of processes gone for good do not pile up.
	kvCacheSealPrefix = "meta.cache."
	kvCacheSealTTL    = kvCacheMaxAge + time.Hour
	// kvCacheRequestWait bounds each request of a cache write (the
	// barrier, the seal): a cluster member that lost its quorum, which
	// may still answer as the stream's leader for a while, never acks
	// the seal.
	kvCacheRequestWait = 2 * time.Second
)

var kvCacheCRC = crc32.MakeTable(crc32.Castagnoli)

// kvCache is a decoded cache file.
type kvCache struct {
	stream  string    // the bucket's stream name
	created time.Time // the stream's creation time
	seq     uint64    // the last stream sequence the index reflects
	// written is when the index was last known to reflect every message
	// up to seq: no later message was stored before it.
	written time.Time
	// The seal: its key, sequence and nonce.
	sealKey   string
	sealSeq   uint64
	sealNonce string
	ops       *opLayers
	mappings  map[string]kvEntry[commands.Mapping]
	exports   map[string]kvEntry[commands.Export]
	// The lowest and highest revision held, and the key at the highest.
	minRev, maxRev uint64
	maxKey         string
}

// saveCache writes the index to the cache file: to a temporary file,
// synced, then renamed over the last one, so that a crash leaves the
// last file or the new one, whole. Only what the watcher applied (up to
// k.seen) is written: this process's writes it has not delivered yet are
// read again from the bucket at the next start. It is dated when it
// began when the watcher had read the bucket to its end (barrier), and
// otherwise at the stream time of the last message the watcher delivered
// (k.seenAt) if earlier: a marker it has not read yet is no older than
// that. Its seal is written first (kvCacheSealPrefix).
//
// The file holds the delta of the operation index and names its base
// file, which stays as it is, so that a write costs the delta, not the
// history; when a new base is due (opLayers.rebase), the base file is
// written first, synced, then the cache file naming it, and the base
// files no cache file names any longer are removed (cleanBases).
func (k *KV) saveCache(ctx context.Context) error {
	if k.cache == "" {
		return nil
	}
	began := time.Now()
	rctx, cancel := context.WithTimeout(ctx, kvCacheRequestWait)
	target, info, terr := k.barrierInfo(rctx)
	cancel()
	if info == nil {
		info = k.stream.CachedInfo() // its name and creation time
	} else if !quorate(info) {
		// A seal it cannot commit now may be committed later, and
		// replace the seal of the file it has.
		return errors.New("state: write index cache: the stream's leader has lost its quorum")
	}
	nonce := uuid.NewString()
	rctx, cancel = context.WithTimeout(ctx, kvCacheRequestWait)
	ack, err := k.js.Publish(rctx, k.subject(k.sealKey), []byte(nonce), jetstream.WithMsgTTL(kvCacheSealTTL))
	cancel()
	if err != nil {
		return fmt.Errorf("state: write index cache: seal: %w", err)
	}
	k.mu.RLock()
	// The file reflects the revisions up to its seal at most (those the
	// watcher applied past it are left out, and read again at the next
	// start), so that the seal vouches for every one it holds. Every
	// message past the seal came after began.
	seq, complete := min(k.seen, ack.Sequence), began.UnixNano()
	if terr != nil || target > k.seen {
		complete = min(complete, k.seenAt.Load())
	}
	ops := k.ops
	head := cacheHead{stream: info.Config.Name, created: info.Created.UnixNano(), seq: seq, written: complete,
		sealKey: k.sealKey, sealSeq: ack.Sequence, nonce: nonce}
	if !ops.rebase() {
		// The delta, encoded under the lock (no copy of it), and the
		// base file the last cache file named.
		var ref baseRef
		if ops.base != nil {
			ref = ops.base.ref
		}
		body := encodeCache(head, ref, ops, k.mappings, k.exports)
		k.mu.RUnlock()
		if err := writeCacheFile(k.cache, body); err != nil {
			return fmt.Errorf("state: write index cache: %w", err)
		}
		k.mu.Lock()
		k.cached = ack.Sequence // the seal is no change to write again
		k.mu.Unlock()
		k.cleanBases(ref.name)
		k.log.Debug("index cache written", "cache", k.cache, "sequence", seq, "bytes", len(body)+4,
			"took", time.Since(began).Round(time.Millisecond))
		return nil
	}
	// The changes made from now on are made again on the new base.
	journal := []opChange{}
	ops.journal = &journal
	var rest []opChange
	var ref baseRef
	var body []byte
	if ops.small() {
		// Written from a copy, without the lock: writes and reads go
		// on meanwhile.
		snap, mappings, exports := ops.snapshot(), maps.Clone(k.mappings), maps.Clone(k.exports)
		k.mu.RUnlock()
		ref, err = writeBaseFile(k.cache, snap, seq)
		body = encodeCache(head, ref, nil, mappings, exports)
		rest = snap.rest(seq)
	} else {
		// A delta as large as the start's (every record read into the
		// heap) is not copied: written under the lock.
		ref, err = writeBaseFile(k.cache, ops, seq)
		body = encodeCache(head, ref, nil, k.mappings, k.exports)
		rest = ops.rest(seq)
		k.mu.RUnlock()
	}
	defer func() {
		k.mu.Lock()
		ops.journal = nil
		k.mu.Unlock()
	}()
	if err != nil {
		return fmt.Errorf("state: write index base: %w", err)
	}
	if err := writeCacheFile(k.cache, body); err != nil {
		// No cache file names the new base: the last one stays.
		_ = os.Remove(filepath.Join(filepath.Dir(k.cache), ref.name))
		return fmt.Errorf("state: write index cache: %w", err)
	}
	// The new base, read back as a start would: it replaces the base and
	// the delta it was written from.
	c, err := readCache(k.cache)
	if err != nil {
		return fmt.Errorf("state: read index cache written: %w", err)
	}
	k.mu.Lock()
	c.ops.adopt(ops, rest, journal)
	k.ops = c.ops
	k.cached = ack.Sequence // the seal is no change to write again
	n := k.ops.len()
	// What the base left out (a watcher behind) and the changes made
	// while it was written may fill the new delta already.
	k.nudge()
	k.mu.Unlock()
	k.cleanBases(ref.name)
	k.log.Debug("index cache written with a new base", "cache", k.cache, "base", ref.name, "sequence", seq,
		"operations", n, "bytes", ref.size+int64(len(body))+4, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

// cacheHead is what a cache file begins with, after its version.
type cacheHead struct {
	stream  string
	created int64 // the stream's creation, Unix ns
	seq     uint64
	written int64 // Unix ns
	sealKey string
	sealSeq uint64
	nonce   string
}

func (h *cacheHead) encode(e *cacheEncoder, version uint64) {
	e.str(kvCacheMagic)
	e.uvarint(version)
	e.str(h.stream)
	e.varint(h.created)
	e.uvarint(h.seq)
	e.varint(h.written)
	e.str(h.sealKey)
	e.uvarint(h.sealSeq)
	e.str(h.nonce)
}

// baseRef names a base file in a cache file: its name (beside the cache
// file), size, checksum (its last 4 bytes) and id (random, in its
// header), so that a start refuses a cache file whose base file is
// missing, cut, or another.
type baseRef struct {
	name string
	size int64
	sum  uint32
	id   string
}

// A base file's name is the cache file's, kvBaseInfix, the sequence it
// was written at and a random suffix, so that a new one never replaces
// the one a cache file names.
const (
	kvBaseMagic   = "volumed kv index base\n"
	kvBaseVersion = 1
	kvBaseInfix   = ".base."
)

// writeBaseFile writes the operations of ops at revisions up to seq as a
// new base file beside the cache file cache: to a temporary file, then
// synced and renamed to a name no cache file names yet.
func writeBaseFile(cache string, ops *opLayers, seq uint64) (baseRef, error) {
	var rnd [20]byte
	_, _ = rand.Read(rnd[:]) // never fails (crypto/rand)
	ref := baseRef{name: filepath.Base(cache) + kvBaseInfix + strconv.FormatUint(seq, 10) + "." + hex.EncodeToString(rnd[:4]),
		id: hex.EncodeToString(rnd[4:])}
	path := filepath.Join(filepath.Dir(cache), ref.name)
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return baseRef{}, err
	}
	defer func() {
		_ = f.Close()
		_ = os.Remove(tmp) // gone after a rename
	}()
	err = writeBase(f, ops.records(seq), func(strs []string, kinds int, named []opNamed, termDur time.Duration) (int64, error) {
		cw := &countWriter{w: f}
		w := bufio.NewWriterSize(cw, 1<<16)
		e := cacheEncoder{w: w}
		e.str(kvBaseMagic)
		e.uvarint(kvBaseVersion)
		e.str(ref.id)
		encodeBaseTables(&e, strs, kinds, named, termDur)
		err := w.Flush()
		return cw.n, err
	})
	if err != nil {
		return baseRef{}, err
	}
	if ref.sum, err = finishCacheFile(f, tmp, path); err != nil {
		return baseRef{}, err
	}
	st, err := f.Stat()
	if err != nil {
		_ = os.Remove(path)
		return baseRef{}, err
	}
	ref.size = st.Size()
	return ref, nil
}

// encodeCache encodes a cache file of version kvCacheVersion but its
// checksum: h, the mappings and exports at revisions up to h.seq, ref
// (the base file; no name: none), and of x (nil: none) the operations
// of its delta at revisions up to h.seq, with the base's dead slots.
func encodeCache(h cacheHead, ref baseRef, x *opLayers, mappings map[string]kvEntry[commands.Mapping], exports map[string]kvEntry[commands.Export]) []byte {
	var buf bytes.Buffer
	w := bufio.NewWriter(&buf)
	e := &cacheEncoder{w: w}
	h.encode(e, kvCacheVersion)
	encodeEntries(e, mappings, h.seq)
	encodeEntries(e, exports, h.seq)
	e.str(ref.name)
	e.uvarint(uint64(ref.size))
	e.uvarint(uint64(ref.sum))
	e.str(ref.id)
	// The delta's operations after their string table: "" first.
	var ops bytes.Buffer
	ow := bufio.NewWriter(&ops)
	oe := &cacheEncoder{w: ow}
	strs, at := []string{""}, map[string]uint64{"": 0}
	n := 0
	var dead []uint64
	if x != nil {
		d := x.delta
		var r opRec
		for i := range d.ascending {
			if d.slots[i].rev > h.seq {
				continue
			}
			d.rec(i, &r)
			if r.name != "" {
				oe.uvarint(1)
				oe.str(r.name)
			} else {
				oe.uvarint(0)
				_, _ = ow.Write(r.key[:])
			}
			oe.uvarint(r.rev)
			oe.varint(r.created)
			oe.varint(r.completed)
			oe.varint(int64(r.duration))
			for _, s := range r.vals {
				hs, ok := at[s]
				if !ok {
					hs = uint64(len(strs))
					at[s], strs = hs, append(strs, s)
				}
				oe.uvarint(hs)
			}
			n++
		}
		dead = x.dead
	}
	_ = ow.Flush()
	e.uvarint(uint64(len(strs)))
	for _, s := range strs {
		e.str(s)
	}
	e.uvarint(uint64(n))
	_, _ = w.Write(ops.Bytes())
	// The dead slots, each as its distance from the last (the first:
	// from 0).
	nd := 0
	for _, v := range dead {
		nd += bits.OnesCount64(v)
	}
	e.uvarint(uint64(nd))
	last := uint64(0)
	for j, v := range dead {
		for v != 0 {
			slot := uint64(j*64 + bits.TrailingZeros64(v))
			e.uvarint(slot - last)
			last = slot
			v &= v - 1
		}
	}
	_ = w.Flush()
	return buf.Bytes()
}

// writeCacheFile writes body and its checksum as the cache file at path,
// through a temporary file synced and renamed.
func writeCacheFile(path string, body []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		_ = f.Close()
		_ = os.Remove(tmp) // gone after a rename
	}()
	if _, err := f.Write(body); err != nil {
		return err
	}
	_, err = finishCacheFile(f, tmp, path)
	return err
}

// finishCacheFile appends the checksum of what f (at tmp) holds, syncs
// it and renames it to path, so that a crash leaves the last file or the
// new one, whole. It returns the checksum.
func finishCacheFile(f *os.File, tmp, path string) (uint32, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	sum, err := crcFile(f, st.Size())
	if err != nil {
		return 0, err
	}
	if _, err := f.WriteAt(binary.LittleEndian.AppendUint32(nil, sum), st.Size()); err != nil {
		return 0, err
	}
	if err := f.Sync(); err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return 0, err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync() // the rename itself
		_ = d.Close()
	}
	return sum, nil
}

// cleanBases removes the base files beside the cache file but keep (the
// one the cache file names; "": none) and their temporary files: those
// of the cache files before, of a refused one, or of a write a crash
// stopped.
func (k *KV) cleanBases(keep string) {
	dir, prefix := filepath.Dir(k.cache), filepath.Base(k.cache)+kvBaseInfix
	entries, err := os.ReadDir(dir)
	if err != nil {
		k.log.Warn("index bases not cleaned", "dir", dir, "err", err)
		return
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) || name == keep {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			k.log.Warn("index base not removed", "base", name, "err", err)
		}
	}
}

// countWriter counts the bytes written through it.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// quorate reports whether the stream of info has a leader with a quorum
// of current replicas, itself included (always, with one replica).
func quorate(info *jetstream.StreamInfo) bool {
	if info.Cluster == nil || len(info.Cluster.Replicas) == 0 {
		return true
	}
	n := 1
	for _, r := range info.Cluster.Replicas {
		if r.Current && !r.Offline {
			n++
		}
	}
	return info.Cluster.Leader != "" && n > (len(info.Cluster.Replicas)+1)/2
}

// loadCache fills the indexes from the cache file when it is sound and
// reflects this bucket, and returns the last stream sequence it reflects;
// 0 (read every record) otherwise, saying why.
func (k *KV) loadCache(ctx context.Context) uint64 {
	if k.cache == "" {
		return 0
	}
	began := time.Now()
	c, err := readCache(k.cache)
	if errors.Is(err, fs.ErrNotExist) {
		k.log.Info("no index cache: reading every record", "cache", k.cache)
		k.cleanBases("")
		return 0
	}
	if err != nil {
		k.log.Warn("index cache not used: reading every record", "cache", k.cache, "err", err)
		k.dropCache()
		return 0
	}
	keep := ""
	if c.ops.base != nil {
		keep = c.ops.base.ref.name
	}
	why, err := k.cacheDoubt(ctx, c)
	if err != nil {
		// No answer is no doubt of the file: the next start asks again.
		k.log.Warn("index cache not checked: reading every record", "cache", k.cache, "err", err)
		c.ops.base.close()
		k.cleanBases(keep)
		return 0
	}
	if why != "" {
		k.log.Info("index cache not used: reading every record", "cache", k.cache, "reason", why)
		c.ops.base.close()
		k.dropCache()
		return 0
	}
	// The mappings in the order of their revisions, as the watcher
	// applies them: of two holding one device (written before device
	// claims), the device index keeps the later.
	vols := slices.SortedFunc(maps.Keys(c.mappings), func(a, b string) int {
		return cmp.Compare(c.mappings[a].rev, c.mappings[b].rev)
	})
	k.cleanBases(keep)
	k.sealKey = c.sealKey // its next seal replaces this one
	k.mu.Lock()
	k.ops, k.seen, k.loaded, k.cached, k.exports = c.ops, c.seq, c.seq, c.sealSeq, c.exports
	k.seenAt.Store(c.written.UnixNano())
	for _, id := range vols {
		k.setMapping(id, c.mappings[id])
	}
	n := k.ops.len()
	k.mu.Unlock()
	k.log.Info("index cache loaded: reading the records written since", "cache", k.cache, "sequence", c.seq,
		"operations", n, "written", c.written.UTC().Format(time.RFC3339), "took", time.Since(began).Round(time.Millisecond))
	return c.seq
}

// newSealKey is the seal key of a store whose cache file is missing or
// refused: random, so that no other process sharing the bucket (another
// cluster member, another host with the same data dir path and host
// name) writes seals on it. A start that uses its cache keeps the file's
// key (loadCache), so each seal of a process replaces its last.
func newSealKey() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return kvCacheSealPrefix + hex.EncodeToString(b[:])
}

// dropCache removes a cache file a start refused, and the base files.
// Some doubts pass with time (a stream restored from an earlier backup
// ends before the cache's sequence until new writes reach it, with other
// records there), so a file once refused is never read again.
func (k *KV) dropCache() {
	if err := os.Remove(k.cache); err != nil && !errors.Is(err, fs.ErrNotExist) {
		k.log.Warn("index cache not removed", "cache", k.cache, "err", err)
	}
	k.cleanBases("")
}

// cacheDoubt says why cache c may not reflect the bucket, "" when it
// does: it was written from another stream (another bucket, or one made
// again), the stream is behind it or does not hold its seal (another
// history), a record it holds
// is gone without a marker the watcher would deliver (the stream's first
// sequence is past it), it is older than a delete marker may live, or the
// message at its highest revision is on another key. Its requests wait for
// a cluster still forming (formation.Wait); an error is one they never
// got an answer to.
func (k *KV) cacheDoubt(ctx context.Context, c *kvCache) (string, error) {
	var info *jetstream.StreamInfo
	if err := formation.Wait(ctx, k.log, "index cache: stream info", func(ctx context.Context) error {
		var err error
		info, err = k.stream.Info(ctx)
		return err
	}); err != nil {
		return "", fmt.Errorf("stream info: %w", err)
	}
	age := time.Since(c.written)
	switch {
	case c.stream != info.Config.Name:
		return "written for stream " + c.stream, nil
	case !c.created.Equal(info.Created):
		return "written for an earlier stream of that name", nil
	case c.seq > info.State.LastSeq:
		return fmt.Sprintf("written at sequence %d, the stream ends at %d", c.seq, info.State.LastSeq), nil
	case c.minRev != 0 && info.State.FirstSeq > c.minRev:
		return fmt.Sprintf("holds revision %d, the stream begins at %d", c.minRev, info.State.FirstSeq), nil
	case age > kvCacheMaxAge || age < -time.Minute:
		return "written at " + c.written.UTC().Format(time.RFC3339), nil
	}
	seal, err := k.getMsg(ctx, c.sealSeq)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return fmt.Sprintf("its seal (sequence %d) is gone", c.sealSeq), nil
	case err != nil:
		return "", fmt.Errorf("read seal: %w", err)
	case seal.Subject != k.subject(c.sealKey) || string(seal.Data) != c.sealNonce:
		return fmt.Sprintf("sequence %d is not its seal: another history", c.sealSeq), nil
	}
	if c.maxRev == 0 {
		return "", nil
	}
	msg, err := k.getMsg(ctx, c.maxRev)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return "", nil // replaced since: the watcher reads what replaced it
	case err != nil:
		return "", fmt.Errorf("read revision: %w", err)
	case msg.Subject != k.subject(c.maxKey):
		return fmt.Sprintf("revision %d is %s, not %s", c.maxRev, msg.Subject, k.subject(c.maxKey)), nil
	}
	return "", nil
}

// getMsg reads the message at seq, waiting for a cluster still forming.
func (k *KV) getMsg(ctx context.Context, seq uint64) (*jetstream.RawStreamMsg, error) {
	var msg *jetstream.RawStreamMsg
	err := formation.Wait(ctx, k.log, "index cache: message "+strconv.FormatUint(seq, 10), func(ctx context.Context) error {
		var err error
		msg, err = k.stream.GetMsg(ctx, seq)
		return err
	})
	return msg, err
}

// readCache reads and checks a cache file. Of version 4, the delta of
// the operation index is read into the heap and its base file is opened
// and checked (openBaseFile), then read from (opBase); of version 3, the
// base stays in the cache file, open, and is read from it; of version 2
// (the release before it), the operations are read into the heap, as a
// stream: a whole-file buffer would be as large as the index, and
// garbage right after the start.
func readCache(path string) (*kvCache, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	c, err := readCacheFile(f, path)
	if err != nil || c.ops.base == nil || c.ops.base.f != f {
		_ = f.Close()
	}
	return c, err
}

func readCacheFile(f *os.File, path string) (*kvCache, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	if size < 4 {
		return nil, errors.New("truncated")
	}
	// The version, from the file's first bytes.
	head := &io.LimitedReader{R: io.NewSectionReader(f, 0, size-4), N: size - 4}
	hd := &cacheDecoder{r: bufio.NewReaderSize(head, 64), left: head}
	if hd.str() != kvCacheMagic {
		return nil, cmp.Or(hd.err, errors.New("not an index cache"))
	}
	switch v := hd.uvarint(); {
	case hd.err != nil:
		return nil, hd.err
	case v == kvCacheVersionV2:
		return readCacheV2(f, size)
	case v == kvCacheVersion:
		return readCacheV4(f, path, size)
	case v != kvCacheVersionV3:
		return nil, fmt.Errorf("version %d, not %d", v, kvCacheVersion)
	}
	d, err := basePrefix(f, size)
	if err != nil {
		return nil, err
	}
	c, err := decodeCacheHead(d, kvCacheVersionV3)
	if err != nil {
		return nil, err
	}
	c.mappings = decodeEntries[commands.Mapping](d, c, kvMappingPrefix)
	c.exports = decodeEntries[commands.Export](d, c, kvExportPrefix)
	if d.err != nil {
		return nil, d.err
	}
	b, err := openBase(f, path, size, d, c, nil)
	if err != nil {
		return nil, err
	}
	c.ops = layersOn(b, nil)
	return c, nil
}

// basePrefix returns a decoder of the prefix of the base in f (of size
// bytes), up to its first section, which its footer says.
func basePrefix(f *os.File, size int64) (*cacheDecoder, error) {
	if size < baseFooter+4 {
		return nil, errors.New("truncated")
	}
	var end [8]byte
	if _, err := f.ReadAt(end[:], size-4-8); err != nil {
		return nil, err
	}
	prefix := int64(binary.LittleEndian.Uint64(end[:]))
	if prefix <= 0 || prefix > size-4-baseFooter {
		return nil, errors.New("bad footer")
	}
	body := &io.LimitedReader{R: io.NewSectionReader(f, 0, prefix), N: prefix}
	return &cacheDecoder{r: bufio.NewReaderSize(body, 1<<16), left: body}, nil
}

// readCacheV4 reads a cache file of version 4: its delta into the heap,
// over the base file it names.
func readCacheV4(f *os.File, path string, size int64) (*kvCache, error) {
	want, err := crcFile(f, size-4)
	if err != nil {
		return nil, err
	}
	var tail [4]byte
	if _, err := f.ReadAt(tail[:], size-4); err != nil {
		return nil, err
	}
	if want != binary.LittleEndian.Uint32(tail[:]) {
		return nil, errors.New("bad checksum")
	}
	body := &io.LimitedReader{R: io.NewSectionReader(f, 0, size-4), N: size - 4}
	d := &cacheDecoder{r: bufio.NewReaderSize(body, 1<<16), left: body}
	c, err := decodeCacheHead(d, kvCacheVersion)
	if err != nil {
		return nil, err
	}
	c.mappings = decodeEntries[commands.Mapping](d, c, kvMappingPrefix)
	c.exports = decodeEntries[commands.Export](d, c, kvExportPrefix)
	ref := baseRef{name: d.str(), size: int64(d.uvarint()), sum: uint32(d.uvarint()), id: d.str()}
	delta, err := decodeDelta(d, c)
	if err != nil {
		return nil, err
	}
	var dead []uint64
	last := uint64(0)
	for j := range d.count(1) {
		gap := d.uvarint()
		slot := last + gap
		if d.err != nil {
			return nil, d.err
		}
		if (j > 0 && gap == 0) || slot >= math.MaxUint32 {
			return nil, errors.New("bad dead slots")
		}
		for uint64(len(dead)) <= slot/64 {
			dead = append(dead, 0)
		}
		dead[slot/64] |= 1 << (slot % 64)
		last = slot
	}
	if d.err != nil {
		return nil, d.err
	}
	if d.remaining() != 0 {
		return nil, errors.New("trailing bytes")
	}
	c.ops = newOpLayers()
	if ref.name != "" {
		if filepath.Base(ref.name) != ref.name || !strings.HasPrefix(ref.name, filepath.Base(path)+kvBaseInfix) {
			return nil, fmt.Errorf("bad base name %q", ref.name)
		}
		b, err := openBaseFile(filepath.Join(filepath.Dir(path), ref.name), ref, c, dead)
		if errors.Is(err, fs.ErrNotExist) {
			// A cache file whose base is gone is refused, not missing.
			return nil, fmt.Errorf("base %s: missing", ref.name)
		}
		if err != nil {
			return nil, fmt.Errorf("base %s: %w", ref.name, err)
		}
		c.ops = layersOn(b, dead)
	} else if len(dead) > 0 {
		return nil, errors.New("dead slots without a base")
	}
	c.ops.delta = delta
	return c, nil
}

// decodeDelta reads the delta's operations of a version 4 file into a
// new index.
func decodeDelta(d *cacheDecoder, c *kvCache) (*opIndex, error) {
	nstr := d.count(1)
	strs := make([]string, nstr)
	for h := range strs {
		strs[h] = d.str()
	}
	if d.err == nil && (nstr == 0 || strs[0] != "") {
		return nil, errors.New("bad string table")
	}
	n := d.count(8)
	x := newOpIndex()
	x.grow(n)
	x.deferred = true
	for j := range n {
		var id string
		switch d.uvarint() {
		case 0:
			var k opKey
			d.fixed(k[:])
			id = string(appendOpID(make([]byte, 0, len(opIDPrefix)+36), &k))
		case 1:
			id = d.str()
			if _, canon := parseOpKey(id); canon || id == "" {
				return nil, cmp.Or(d.err, fmt.Errorf("operation %d: bad id", j))
			}
		default:
			return nil, cmp.Or(d.err, fmt.Errorf("operation %d: bad id", j))
		}
		rev, created, completed, duration := d.uvarint(), d.varint(), d.varint(), time.Duration(d.varint())
		var vals [len(indexDims)]string
		for dim := range vals {
			h := d.uvarint()
			if h >= uint64(nstr) {
				return nil, cmp.Or(d.err, fmt.Errorf("operation %d: bad string %d", j, h))
			}
			vals[dim] = strs[h]
		}
		if d.err != nil {
			return nil, d.err
		}
		if rev == 0 || vals[1] == "" {
			return nil, fmt.Errorf("operation %d: bad entry", j)
		}
		if _, dup := x.byID.get(x, id); dup {
			return nil, fmt.Errorf("operation %d: twice", j)
		}
		f := opFields[string]{typ: vals[0], status: vals[1], volume: vals[2], vm: vals[3], by: vals[4],
			created: created, completed: completed, duration: duration}
		putSlot(x, 0, false, rev, id, &f)
		if c.note(rev) {
			c.maxKey = kvOpPrefix + id
		}
	}
	if d.err != nil {
		return nil, d.err
	}
	x.endDeferred()
	return x, nil
}

// openBaseFile opens and checks the base file at path, which ref names,
// its slots dead left out (openBase).
func openBaseFile(path string, ref baseRef, c *kvCache, dead []uint64) (*opBase, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	b, err := readBaseFile(f, path, ref, c, dead)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return b, nil
}

func readBaseFile(f *os.File, path string, ref baseRef, c *kvCache, dead []uint64) (*opBase, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	if size != ref.size {
		return nil, fmt.Errorf("%d bytes, not %d", size, ref.size)
	}
	var tail [4]byte
	if _, err := f.ReadAt(tail[:], size-4); err != nil {
		return nil, err
	}
	if binary.LittleEndian.Uint32(tail[:]) != ref.sum {
		return nil, errors.New("another base: its checksum differs")
	}
	d, err := basePrefix(f, size)
	if err != nil {
		return nil, err
	}
	if d.str() != kvBaseMagic {
		return nil, cmp.Or(d.err, errors.New("not an index base"))
	}
	if v := d.uvarint(); v != kvBaseVersion {
		return nil, cmp.Or(d.err, fmt.Errorf("version %d, not %d", v, kvBaseVersion))
	}
	if id := d.str(); id != ref.id {
		return nil, cmp.Or(d.err, errors.New("another base: its id differs"))
	}
	b, err := openBase(f, path, size, d, c, dead)
	if err != nil {
		return nil, err
	}
	b.ref = ref
	return b, nil
}

// readCacheV2 reads a cache file of version 2 into the heap.
func readCacheV2(f *os.File, size int64) (*kvCache, error) {
	sum := crc32.New(kvCacheCRC)
	body := &io.LimitedReader{R: io.NewSectionReader(f, 0, size-4), N: size - 4}
	d := &cacheDecoder{r: bufio.NewReaderSize(io.TeeReader(body, sum), 1<<16), left: body}
	c, err := decodeCacheHead(d, kvCacheVersionV2)
	if err != nil {
		return nil, err
	}
	x, err := decodeOpIndex(d, c)
	if err != nil {
		return nil, err
	}
	c.ops = newOpLayers()
	c.ops.delta = x
	c.mappings = decodeEntries[commands.Mapping](d, c, kvMappingPrefix)
	c.exports = decodeEntries[commands.Export](d, c, kvExportPrefix)
	if d.err != nil {
		return nil, d.err
	}
	if d.remaining() != 0 {
		return nil, errors.New("trailing bytes")
	}
	var tail [4]byte
	if _, err := f.ReadAt(tail[:], size-4); err != nil {
		return nil, err
	}
	if sum.Sum32() != binary.LittleEndian.Uint32(tail[:]) {
		return nil, errors.New("bad checksum")
	}
	return c, nil
}

// decodeCacheHead decodes the header every version begins with: its
// magic, version (which must be version), stream, sequence and seal.
func decodeCacheHead(d *cacheDecoder, version uint64) (*kvCache, error) {
	if d.str() != kvCacheMagic {
		return nil, cmp.Or(d.err, errors.New("not an index cache"))
	}
	if v := d.uvarint(); v != version {
		return nil, cmp.Or(d.err, fmt.Errorf("version %d, not %d", v, version))
	}
	c := &kvCache{stream: d.str(), created: time.Unix(0, d.varint()), seq: d.uvarint(), written: time.Unix(0, d.varint()),
		sealKey: d.str(), sealSeq: d.uvarint(), sealNonce: d.str()}
	return c, d.err
}

// note records revision rev in c's bounds, and reports whether it is the
// highest so far (whose key the caller sets).
func (c *kvCache) note(rev uint64) bool {
	if c.minRev == 0 || rev < c.minRev {
		c.minRev = rev
	}
	if rev > c.maxRev {
		c.maxRev = rev
		return true
	}
	return false
}

// decodeOpIndex reads the operations of a version 2 file into a new index. The operations
// come oldest first, so each list is made by appending.
func decodeOpIndex(d *cacheDecoder, c *kvCache) (*opIndex, error) {
	x := newOpIndex()
	nstr := d.count(1)
	if nstr == 0 {
		return nil, errors.New("no strings")
	}
	// The names keep the table's numbers; the types and statuses are
	// interned again (kindOf: table number → kinds number, 0 until seen).
	x.names.strs, x.names.users = make([]string, nstr), make([]int64, nstr)
	for h := range x.names.strs {
		x.names.strs[h] = d.str()
	}
	if x.names.strs[0] != "" {
		return nil, errors.New("string 0 is not empty")
	}
	kindOf := make([]uint32, nstr)
	n := d.count(10)
	x.slots, x.byID = make([]opSlot, 0, n), newIDTable(n)
	for range n {
		i := uint32(len(x.slots))
		var s opSlot
		var canon bool
		id := d.bytes() // valid until the next read
		s.key, canon = parseOpKey(id)
		name := ""
		if !canon {
			s.flags, name = slotNamed, string(id)
		}
		s.rev = d.uvarint()
		created, completed, duration := d.varint(), d.varint(), time.Duration(d.varint())
		var h [len(indexDims)]uint32
		for dim := range h {
			v := d.uvarint()
			if v >= uint64(nstr) || (v != 0 && x.names.strs[v] == "") {
				return nil, fmt.Errorf("operation %d: bad string %d", i, v)
			}
			h[dim] = uint32(v)
		}
		if d.err != nil {
			return nil, d.err
		}
		if (s.named() && name == "") || h[1] == 0 || s.rev == 0 {
			return nil, fmt.Errorf("operation %d: bad entry", i)
		}
		if _, dup := x.byID.findKey(x, name, &s.key, canon); dup {
			return nil, fmt.Errorf("operation %d: twice", i)
		}
		for dim := range 2 {
			if v := h[dim]; v != 0 {
				if kindOf[v] == 0 {
					kindOf[v] = addName(&x.kinds, x.names.strs[v])
				} else {
					x.kinds.users[kindOf[v]]++
				}
				h[dim] = kindOf[v]
			}
		}
		for _, v := range h[2:] {
			x.names.users[v]++
		}
		x.slots = append(x.slots, s)
		x.set(i, h[0], h[1], h[2], h[3], h[4], created, completed, duration)
		if s.named() {
			x.named[i] = name
		}
		if i > 0 && x.compare(i-1, i) >= 0 {
			return nil, fmt.Errorf("operation %d: out of order", i)
		}
		x.byID.add(x, i)
		if c.note(s.rev) {
			c.maxKey = kvOpPrefix + x.idOf(i)
		}
		x.count(i, 1)
	}
	x.names.users[0] = 0
	for h, s := range x.names.strs {
		switch {
		case h == 0:
		case x.names.users[h] > 0:
			x.names.ids[s] = uint32(h)
		default:
			x.names.strs[h] = ""
			x.names.free = append(x.names.free, uint32(h))
		}
	}
	// The lists: oldest first, as the slots.
	x.setLists(func(yield func(uint32) bool) {
		for i := range uint32(n) {
			if !yield(i) {
				return
			}
		}
	})
	return x, nil
}

// encodeEntries writes the records of entries at revisions up to maxRev.
func encodeEntries[T any](e *cacheEncoder, entries map[string]kvEntry[T], maxRev uint64) {
	n := 0
	for _, v := range entries {
		if v.v != nil && v.rev <= maxRev {
			n++
		}
	}
	e.uvarint(uint64(n))
	for id, v := range entries {
		if v.v != nil && v.rev <= maxRev {
			e.str(id)
			e.uvarint(v.rev)
			e.str(string(v.raw))
		}
	}
}

// decodeEntries reads what encodeEntries wrote, the records of keys
// under prefix.
func decodeEntries[T any](d *cacheDecoder, c *kvCache, prefix string) map[string]kvEntry[T] {
	n := d.count(3)
	entries := make(map[string]kvEntry[T], n)
	for range n {
		id, rev, raw := d.str(), d.uvarint(), []byte(d.str())
		if d.err != nil {
			break
		}
		v, err := decodeRecord[T](prefix+id, id, raw)
		if err == nil && (rev == 0 || v == nil) {
			err = errors.New("no revision or value")
		}
		if err != nil {
			d.err = fmt.Errorf("%s%s: %w", prefix, id, err)
			break
		}
		entries[id] = kvEntry[T]{rev: rev, v: v, raw: raw}
		if c.note(rev) {
			c.maxKey = prefix + id
		}
	}
	return entries
}

// cacheEncoder writes varints and length-prefixed strings.
type cacheEncoder struct {
	w   *bufio.Writer
	buf [binary.MaxVarintLen64]byte
}

func (e *cacheEncoder) uvarint(v uint64) { _, _ = e.w.Write(binary.AppendUvarint(e.buf[:0], v)) }
func (e *cacheEncoder) varint(v int64)   { _, _ = e.w.Write(binary.AppendVarint(e.buf[:0], v)) }
func (e *cacheEncoder) str(s string) {
	e.uvarint(uint64(len(s)))
	_, _ = e.w.WriteString(s)
}

// cacheDecoder reads what a cacheEncoder wrote; the first error sticks
// and every read after it returns zero.
type cacheDecoder struct {
	r    *bufio.Reader
	left *io.LimitedReader // what r reads from
	buf  []byte
	err  error
}

// remaining is how many bytes are left to read.
func (d *cacheDecoder) remaining() int64 { return d.left.N + int64(d.r.Buffered()) }

func (d *cacheDecoder) fail(err error) {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	d.err = cmp.Or(d.err, fmt.Errorf("truncated: %w", err))
}

func (d *cacheDecoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, err := binary.ReadUvarint(d.r)
	if err != nil {
		d.fail(err)
	}
	return v
}

func (d *cacheDecoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, err := binary.ReadVarint(d.r)
	if err != nil {
		d.fail(err)
	}
	return v
}

func (d *cacheDecoder) str() string { return string(d.bytes()) }

// bytes reads what cacheEncoder.bytes or str wrote into a buffer that the
// next read reuses.
func (d *cacheDecoder) bytes() []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	if n > uint64(d.remaining()) {
		d.fail(io.EOF)
		return nil
	}
	if uint64(cap(d.buf)) < n {
		d.buf = make([]byte, n)
	}
	b := d.buf[:n]
	if _, err := io.ReadFull(d.r, b); err != nil {
		d.fail(err)
		return nil
	}
	return b
}

// fixed fills p with the next len(p) bytes.
func (d *cacheDecoder) fixed(p []byte) {
	if d.err != nil {
		return
	}
	if _, err := io.ReadFull(d.r, p); err != nil {
		d.fail(err)
	}
}

// count reads a count of items of at least size bytes each, refusing one
// the rest of the input cannot hold.
func (d *cacheDecoder) count(size int) int {
	n := d.uvarint()
	if n > uint64(d.remaining()/int64(size)) {
		d.fail(io.EOF)
		return 0
	}
	return int(n)
}
