package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The archive is a copy of the terminal operation records in files the
// store reads with pread, so that a read of an old record costs a page of
// the page cache instead of a KV get, for which the server loads the whole
// block of the stream holding it (4 MB) into its own memory, in process.
// The bucket stays the only source: an entry is used only for the
// revision the index holds, whole and checked; anything else is read from
// the bucket.
//
// It is a directory of two kinds of files:
//   - segments, <UTC day of completion>.seg, append-only: each entry its
//     length and CRC-32C (4 bytes each), then its revision (8), the id's
//     length (2), the id and the record's JSON;
//   - revision maps, <revision>>kvArchiveMapShift>.map: 8 bytes per
//     revision of the stream, the place of its entry (the segment's day
//     above bit 32, the offset below; 0: none), written in place (sparse
//     until written).
//
// An entry is two writes, its bytes then its place, neither synced: what
// a crash cut fails its checksum, or has no place.
//
// The index finds an entry by the revision it holds, so it keeps no
// pointer itself: its slots, base file and cache file are as without the
// archive. The file "stream" names the archive's layout
// (kvArchiveVersion), the bucket's stream and its creation: the
// revisions of another stream (a bucket made again) are not these, and a
// start beside another one, or another layout, empties the directory:
// the archive is a copy, and what it misses is read from the bucket.
// The file "through" holds the revision through which every terminal
// record the index held was archived (kvbackfill.go); none: 0.
const (
	kvArchiveMapShift = 20
	kvArchiveHead     = 18             // length, checksum, revision, id length
	kvArchiveMaxEntry = 16 << 20       // the largest entry read back
	kvArchiveSegMax   = 1<<32 - 1      // a segment's size: the offset's 32 bits
	kvArchiveMaxOpen  = 256            // files kept open at once
	kvArchiveMargin   = 24 * time.Hour // kept past the retention's cut
	kvArchiveVersion  = "volumed operation archive 1\n"
	kvArchiveStream   = "stream"
	kvArchiveThrough  = "through"
	kvArchiveSeg      = ".seg"
	kvArchiveMap      = ".map"
)

var errArchiveMiss = errors.New("no archive entry")

// opArchive is the archive in one directory; nil: none.
type opArchive struct {
	dir string
	log *slog.Logger

	mu     sync.Mutex
	closed bool
	files  map[string]*os.File // open, by name
	sizes  map[string]int64    // of the segments open for appending
	// pruned: the first day (since the epoch) prune kept; the records of
	// the days before are not archived again (the retention's reads of the
	// records it deletes, a backfill of an old history).
	pruned int64
	// failing: the last append failed, and was logged.
	failing atomic.Bool
}

// openArchive opens the archive in dir for the bucket's stream (name,
// created, its last sequence last), emptying a directory kept for another
// stream, and dropping the entries of revisions past last: the stream was
// restored from an earlier backup (keeping its name and creation time),
// and will write those revisions again.
func openArchive(dir, stream string, created time.Time, last uint64, log *slog.Logger) (*opArchive, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	id := kvArchiveVersion + stream + "\n" + strconv.FormatInt(created.UnixNano(), 10) + "\n"
	path := filepath.Join(dir, kvArchiveStream)
	if was, err := os.ReadFile(path); err != nil || string(was) != id {
		if err == nil {
			log.Info("operation archive of another stream: emptied", "dir", dir)
		}
		if err := removeArchiveFiles(dir, func(string) bool { return true }); err != nil {
			return nil, err
		}
		if err := os.Remove(filepath.Join(dir, kvArchiveThrough)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		if err := os.WriteFile(path, []byte(id), 0o600); err != nil {
			return nil, err
		}
	}
	if err := dropAfter(dir, last); err != nil {
		return nil, err
	}
	a := &opArchive{dir: dir, log: log, files: map[string]*os.File{}, sizes: map[string]int64{}}
	if a.through() > last {
		if err := a.setThrough(last); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// through returns the revision through which every terminal record the
// index held is archived (0: not known of any).
func (a *opArchive) through() uint64 {
	b, err := os.ReadFile(filepath.Join(a.dir, kvArchiveThrough))
	if err != nil {
		return 0
	}
	rev, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0
	}
	return rev
}

// setThrough records rev as through's answer.
func (a *opArchive) setThrough(rev uint64) error {
	path := filepath.Join(a.dir, kvArchiveThrough)
	if err := os.WriteFile(path+".new", []byte(strconv.FormatUint(rev, 10)+"\n"), 0o600); err != nil {
		return err
	}
	return os.Rename(path+".new", path)
}

// dropAfter removes the places of the revisions past last from the maps
// in dir.
func dropAfter(dir string, last uint64) error {
	des, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, de := range des {
		n, ok := strings.CutSuffix(de.Name(), kvArchiveMap)
		if !ok {
			continue
		}
		first, err := strconv.ParseUint(n, 10, 64)
		if err != nil {
			continue
		}
		first <<= kvArchiveMapShift
		path := filepath.Join(dir, de.Name())
		switch {
		case first > last:
			err = os.Remove(path)
		case last-first < 1<<kvArchiveMapShift:
			if st, serr := os.Stat(path); serr != nil || st.Size() > int64(last-first+1)*8 {
				err = os.Truncate(path, int64(last-first+1)*8)
			}
		}
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// removeArchiveFiles removes the segments and maps in dir that drop
// reports true of, by name.
func removeArchiveFiles(dir string, drop func(name string) bool) error {
	des, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, de := range des {
		n := de.Name()
		if (strings.HasSuffix(n, kvArchiveSeg) || strings.HasSuffix(n, kvArchiveMap)) && drop(n) {
			if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// segName is the name of the segment of day (days since 1970-01-01 UTC).
func segName(day uint32) string {
	return time.Unix(int64(day)*86400, 0).UTC().Format(time.DateOnly) + kvArchiveSeg
}

// mapName is the name of the map holding revision rev.
func mapName(rev uint64) string {
	return strconv.FormatUint(rev>>kvArchiveMapShift, 10) + kvArchiveMap
}

// file returns the open file name, opening it (creating it if create)
// if it is not, and closing the others first when kvArchiveMaxOpen are
// open (a read of one of them then fails, and is read from the bucket).
// a.mu is held.
func (a *opArchive) file(name string, create bool) (*os.File, error) {
	if a.closed {
		return nil, os.ErrClosed
	}
	if f, ok := a.files[name]; ok {
		return f, nil
	}
	flag := os.O_RDWR
	if create {
		flag |= os.O_CREATE
	}
	f, err := os.OpenFile(filepath.Join(a.dir, name), flag, 0o600)
	if err != nil {
		return nil, err
	}
	if len(a.files) >= kvArchiveMaxOpen {
		a.closeFiles()
	}
	a.files[name] = f
	return f, nil
}

// closeFiles closes every open file. a.mu is held.
func (a *opArchive) closeFiles() {
	for n, f := range a.files {
		_ = f.Close()
		delete(a.files, n)
		delete(a.sizes, n)
	}
}

// put archives raw, the terminal record of id at revision rev completed
// at completed (opScore), unless revision rev's entry holds it already (a
// start that reads every record again), looked up only if again (a
// revision the watcher delivered, or a record read from the bucket; a
// writer's own is new; two puts at once may both append it, and the map
// then holds the later entry). An entry of another record at rev (a stream
// restored from an earlier backup keeps its name and creation time, and
// writes the dropped history's revisions again) is replaced. The record
// is then read from the bucket if put fails: the first failure after a
// success is logged, not every one; after close put writes nothing.
func (a *opArchive) put(id string, rev uint64, completed int64, raw []byte, again bool) {
	if a == nil {
		return
	}
	if again {
		if was, err := a.get(id, rev); err == nil && bytes.Equal(was, raw) {
			return
		}
	}
	err := a.append(id, rev, completed, raw)
	switch {
	case err == nil:
		a.failing.Store(false)
	case errors.Is(err, os.ErrClosed): // a read in flight at Close
	case !a.failing.Swap(true):
		a.log.Warn("operation not archived; the next failures are not logged until a write succeeds", "id", id, "revision", rev, "err", err)
	}
}

func (a *opArchive) append(id string, rev uint64, completed int64, raw []byte) error {
	day := time.UnixMicro(completed).Unix() / 86400
	size := kvArchiveHead + len(id) + len(raw)
	if day < 1 || day > 1<<32-1 || len(id) > 1<<16-1 || size > kvArchiveMaxEntry {
		return nil // not archived: read from the bucket
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if day < a.pruned {
		return nil // pruned: read from the bucket, until the retention deletes it
	}
	if len(a.files) > kvArchiveMaxOpen-2 {
		a.closeFiles() // not the two opened below
	}
	name := segName(uint32(day))
	m, err := a.file(mapName(rev), true)
	if err != nil {
		return err
	}
	seg, err := a.file(name, true)
	if err != nil {
		return err
	}
	off, ok := a.sizes[name]
	if !ok {
		st, err := seg.Stat()
		if err != nil {
			return err
		}
		off = st.Size()
	}
	if off+int64(size) > kvArchiveSegMax {
		return nil // the segment is full: read from the bucket
	}
	e := make([]byte, 8, size)
	e = binary.LittleEndian.AppendUint64(e, rev)
	e = binary.LittleEndian.AppendUint16(e, uint16(len(id)))
	e = append(append(e, id...), raw...)
	binary.LittleEndian.PutUint32(e, uint32(size-8))
	binary.LittleEndian.PutUint32(e[4:], crc32.Checksum(e[8:], kvCacheCRC))
	n, err := seg.WriteAt(e, off)
	a.sizes[name] = off + int64(n)
	if err != nil {
		return err
	}
	var slot [8]byte
	binary.LittleEndian.PutUint64(slot[:], uint64(day)<<32|uint64(off))
	_, err = m.WriteAt(slot[:], int64(rev&(1<<kvArchiveMapShift-1))*8)
	return err
}

// get returns the record of id at revision rev, errArchiveMiss without an
// entry, another error if the entry is not whole, not this record's or
// not readable.
func (a *opArchive) get(id string, rev uint64) ([]byte, error) {
	if a == nil {
		return nil, errArchiveMiss
	}
	var slot [8]byte
	if err := a.readAt(mapName(rev), slot[:], int64(rev&(1<<kvArchiveMapShift-1))*8); err != nil {
		return nil, err
	}
	p := binary.LittleEndian.Uint64(slot[:])
	if p == 0 {
		return nil, errArchiveMiss
	}
	name, off := segName(uint32(p>>32)), int64(p&(1<<32-1))
	var head [8]byte
	if err := a.readAt(name, head[:], off); err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint32(head[:])
	if n < kvArchiveHead-8 || n > kvArchiveMaxEntry {
		return nil, fmt.Errorf("archive %s at %d: bad length", name, off)
	}
	e := make([]byte, n)
	if err := a.readAt(name, e, off+8); err != nil {
		return nil, err
	}
	idLen := int(binary.LittleEndian.Uint16(e[8:]))
	switch {
	case crc32.Checksum(e, kvCacheCRC) != binary.LittleEndian.Uint32(head[4:]):
		return nil, fmt.Errorf("archive %s at %d: bad checksum", name, off)
	case binary.LittleEndian.Uint64(e) != rev || 10+idLen > len(e) || string(e[10:10+idLen]) != id:
		return nil, fmt.Errorf("archive %s at %d: another record", name, off)
	}
	return e[10+idLen:], nil
}

// readAt fills p from file name at off: errArchiveMiss if the file is
// gone (pruned), closed (the archive's Close, or the open files' limit)
// or shorter (a map with no place written at or past off's; a segment
// a crash cut).
func (a *opArchive) readAt(name string, p []byte, off int64) error {
	a.mu.Lock()
	f, err := a.file(name, false)
	a.mu.Unlock()
	if err == nil {
		_, err = f.ReadAt(p, off)
	}
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, os.ErrClosed) || errors.Is(err, io.EOF) {
		return errArchiveMiss
	}
	return err
}

// prune removes the segments of the days before cut less
// kvArchiveMargin, and the maps last written before then: their
// operations are deleted, or held by the retention, whose records are
// then read from the bucket (and not archived again: pruned).
func (a *opArchive) prune(cut time.Time) {
	if a == nil {
		return
	}
	cut = cut.Add(-kvArchiveMargin)
	day := max(cut.Unix()/86400, 0)
	before := segName(uint32(day))
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return
	}
	a.pruned = max(a.pruned, day)
	err := removeArchiveFiles(a.dir, func(n string) bool {
		if strings.HasSuffix(n, kvArchiveSeg) {
			if n >= before { // the names sort as their days
				return false
			}
		} else if st, err := os.Stat(filepath.Join(a.dir, n)); err != nil || !st.ModTime().Before(cut) {
			return false
		}
		if f, ok := a.files[n]; ok {
			_ = f.Close()
			delete(a.files, n)
			delete(a.sizes, n)
		}
		return true
	})
	if err != nil {
		a.log.Warn("operation archive not pruned", "err", err)
	}
}

// close closes the archive's files; reads and writes after it miss.
func (a *opArchive) close() {
	if a == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closeFiles()
	a.closed = true
}
