package state

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
)

// opBase is the immutable part of the operation index, in a base file
// of its own beside the index cache file (kvcache.go; in the cache file
// itself up to version 3) and read from it with pread
// (os.File.ReadAt) through the page cache, so that it takes no room in
// the process's heap nor in its resident memory: the slots of its
// operations oldest first by (created, id), the ids in buckets, and per
// indexed value the list of its operations' slot numbers. The heap holds
// its small tables: the interned strings, the list and bucket
// directories, the ids not of volumed's form. opLayers puts what changed
// since it in front of it. Its methods are safe for concurrent use; an
// error reading its file (the disk of the data dir failing) panics.
type opBase struct {
	f    *os.File
	path string
	ref  baseRef // its file's, as a cache file names it; no name: in a version 3 cache file
	n    int     // slots
	// strs is the string table: "", the kinds (types and statuses),
	// then the names (volumes, VMs, requesters).
	strs           []string
	kindOf, nameOf map[string]uint32
	named          map[string]uint32 // id → slot, of ids not of volumed's form
	nameAt         map[uint32]string // slot → id, of those
	slotsOff       int64
	idsOff         int64
	buckets        []uint32 // bucket b's ids are entries buckets[b] to buckets[b+1]
	listsOff       int64
	lists          map[baseListKey]baseList
	stats          Stats
}

// baseListKey names a list: a dimension (of indexDims) and a string
// table number.
type baseListKey struct {
	dim uint8
	h   uint32
}

// baseList is a list's first entry and length.
type baseList struct{ start, n int }

// Sizes of the base's fixed records.
const (
	baseSlotSize  = 64 // key 16, rev, created, completed, duration 8 each, typ, status 2 each, volume, vm, by 4 each
	baseEntrySize = 20 // slot 4, typ, status 2 each, volume, vm, by 4 each
	baseIDSize    = 20 // key 16, slot 4
	baseDirSize   = 24 // dim 4, h 4, start 8, n 8
	baseFooter    = 9 * 8
	// baseBucketOps is the mean number of ids per bucket: one read of
	// about 1 KB finds an id.
	baseBucketOps = 64
	// baseChunk is the most entries or slots one read takes.
	baseChunk = 2048
	// baseBucketsMax bounds the buckets (4 million operations at
	// baseBucketOps).
	baseBucketsMax = 1 << 16
)

// baseRec is one slot of the base, decoded.
type baseRec struct {
	key                opKey
	rev                uint64
	created, completed int64
	duration           time.Duration
	h                  [len(indexDims)]uint32 // string table numbers
}

func decodeBaseRec(b []byte, r *baseRec) {
	copy(r.key[:], b[:16])
	le := binary.LittleEndian
	r.rev = le.Uint64(b[16:])
	r.created, r.completed, r.duration = int64(le.Uint64(b[24:])), int64(le.Uint64(b[32:])), time.Duration(le.Uint64(b[40:]))
	r.h = [...]uint32{uint32(le.Uint16(b[48:])), uint32(le.Uint16(b[50:])), le.Uint32(b[52:]), le.Uint32(b[56:]), le.Uint32(b[60:])}
}

func appendBaseRec(b []byte, r *baseRec) []byte {
	le := binary.LittleEndian
	b = append(b, r.key[:]...)
	b = le.AppendUint64(b, r.rev)
	b = le.AppendUint64(b, uint64(r.created))
	b = le.AppendUint64(b, uint64(r.completed))
	b = le.AppendUint64(b, uint64(r.duration))
	b = le.AppendUint16(b, uint16(r.h[0]))
	b = le.AppendUint16(b, uint16(r.h[1]))
	for _, v := range r.h[2:] {
		b = le.AppendUint32(b, v)
	}
	return b
}

// baseEntry is one entry of a list: a slot and its values, so that a
// listing with more than one filter matches without reading the slot.
type baseEntry struct {
	slot uint32
	h    [len(indexDims)]uint32
}

func decodeBaseEntry(b []byte) baseEntry {
	le := binary.LittleEndian
	return baseEntry{slot: le.Uint32(b), h: [...]uint32{uint32(le.Uint16(b[4:])), uint32(le.Uint16(b[6:])),
		le.Uint32(b[8:]), le.Uint32(b[12:]), le.Uint32(b[16:])}}
}

func appendBaseEntry(b []byte, slot uint32, h *[len(indexDims)]uint32) []byte {
	le := binary.LittleEndian
	b = le.AppendUint32(b, slot)
	b = le.AppendUint16(b, uint16(h[0]))
	b = le.AppendUint16(b, uint16(h[1]))
	for _, v := range h[2:] {
		b = le.AppendUint32(b, v)
	}
	return b
}

// readAt fills p from the base's file at off.
func (b *opBase) readAt(p []byte, off int64) {
	if _, err := b.f.ReadAt(p, off); err != nil {
		panic(fmt.Errorf("state: read index base %s: %w", b.path, err))
	}
}

// rec reads slot i.
func (b *opBase) rec(i uint32, r *baseRec) {
	var buf [baseSlotSize]byte
	b.readAt(buf[:], b.slotsOff+int64(i)*baseSlotSize)
	decodeBaseRec(buf[:], r)
}

// idOf is the id of slot i, whose key is k.
func (b *opBase) idOf(i uint32, k *opKey) string {
	if id, ok := b.nameAt[i]; ok {
		return id
	}
	return string(appendOpID(make([]byte, 0, len(opIDPrefix)+36), k))
}

// bucketOf is the bucket of key k among nb (a power of two).
func bucketOf(k *opKey, nb int) int {
	return int(binary.BigEndian.Uint32(k[:4]) & uint32(nb-1))
}

// find returns the slot of id.
func (b *opBase) find(id string) (uint32, bool) {
	if b == nil {
		return 0, false
	}
	k, canon := parseOpKey(id)
	if !canon {
		i, ok := b.named[id]
		return i, ok
	}
	nb := len(b.buckets) - 1
	bk := bucketOf(&k, nb)
	from, to := b.buckets[bk], b.buckets[bk+1]
	if from == to {
		return 0, false
	}
	buf := make([]byte, int(to-from)*baseIDSize)
	b.readAt(buf, b.idsOff+int64(from)*baseIDSize)
	for j := 0; j < len(buf); j += baseIDSize {
		if bytes.Equal(buf[j:j+16], k[:]) {
			return binary.LittleEndian.Uint32(buf[j+16:]), true
		}
	}
	return 0, false
}

// str is string table number h.
func (b *opBase) str(h uint32) string { return b.strs[h] }

// compareRef orders slot i, read into r, against ref, as compareRefs.
func (b *opBase) compareRef(i uint32, r *baseRec, ref opRef, k opKey, canon bool) int {
	if c := cmp.Compare(r.created, ref.score); c != 0 {
		return c
	}
	if _, named := b.nameAt[i]; !named && canon {
		return bytes.Compare(r.key[:], k[:])
	}
	return strings.Compare(b.idOf(i, &r.key), ref.id)
}

// before is the number of slots ordered before ref.
func (b *opBase) before(ref opRef) uint32 {
	k, canon := parseOpKey(ref.id)
	var r baseRec
	lo, hi := 0, b.n
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		b.rec(uint32(mid), &r)
		if b.compareRef(uint32(mid), &r, ref, k, canon) < 0 {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return uint32(lo)
}

// entryAt reads entry j of list l.
func (b *opBase) entryAt(l baseList, j int) baseEntry {
	var buf [baseEntrySize]byte
	b.readAt(buf[:], b.listsOff+int64(l.start+j)*baseEntrySize)
	return decodeBaseEntry(buf[:])
}

// listBefore is the number of entries of l whose slot is below slot.
func (b *opBase) listBefore(l baseList, slot uint32) int {
	lo, hi := 0, l.n
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if b.entryAt(l, mid).slot < slot {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo
}

// down yields the entries of l below end, last first, reading them in
// chunks that grow from 64 entries to baseChunk.
func (b *opBase) down(l baseList, end int, yield func(baseEntry) bool) {
	chunk := 64
	var buf []byte
	for end > 0 {
		from := max(0, end-chunk)
		buf = slices.Grow(buf[:0], (end-from)*baseEntrySize)[:(end-from)*baseEntrySize]
		b.readAt(buf, b.listsOff+int64(l.start+from)*baseEntrySize)
		for j := end - from - 1; j >= 0; j-- {
			if !yield(decodeBaseEntry(buf[j*baseEntrySize:])) {
				return
			}
		}
		end, chunk = from, min(2*chunk, baseChunk)
	}
}

// up yields the entries of l oldest first, in chunks as down does.
func (b *opBase) up(l baseList, yield func(baseEntry) bool) {
	chunk := 64
	var buf []byte
	for from := 0; from < l.n; {
		to := min(l.n, from+chunk)
		buf = slices.Grow(buf[:0], (to-from)*baseEntrySize)[:(to-from)*baseEntrySize]
		b.readAt(buf, b.listsOff+int64(l.start+from)*baseEntrySize)
		for j := range to - from {
			if !yield(decodeBaseEntry(buf[j*baseEntrySize:])) {
				return
			}
		}
		from, chunk = to, min(2*chunk, baseChunk)
	}
}

// slotsDown yields the slots below end, last first, as entries.
func (b *opBase) slotsDown(end int, yield func(baseEntry) bool) {
	chunk := 64
	var buf []byte
	var r baseRec
	for end > 0 {
		from := max(0, end-chunk)
		buf = slices.Grow(buf[:0], (end-from)*baseSlotSize)[:(end-from)*baseSlotSize]
		b.readAt(buf, b.slotsOff+int64(from)*baseSlotSize)
		for j := end - from - 1; j >= 0; j-- {
			decodeBaseRec(buf[j*baseSlotSize:], &r)
			if !yield(baseEntry{slot: uint32(from + j), h: r.h}) {
				return
			}
		}
		end, chunk = from, min(2*chunk, baseChunk)
	}
}

// slotsUp yields every slot oldest first.
func (b *opBase) slotsUp(yield func(uint32, *baseRec) bool) {
	buf := make([]byte, baseChunk*baseSlotSize)
	var r baseRec
	for from := 0; from < b.n; from += baseChunk {
		to := min(b.n, from+baseChunk)
		p := buf[:(to-from)*baseSlotSize]
		b.readAt(p, b.slotsOff+int64(from)*baseSlotSize)
		for j := range to - from {
			decodeBaseRec(p[j*baseSlotSize:], &r)
			if !yield(uint32(from+j), &r) {
				return
			}
		}
	}
}

// handle returns the table number of s in dimension dim.
func (b *opBase) handle(dim int, s string) (uint32, bool) {
	if dim < 2 {
		h, ok := b.kindOf[s]
		return h, ok
	}
	h, ok := b.nameOf[s]
	return h, ok
}

// list returns the list of value s of dimension dim.
func (b *opBase) list(dim int, s string) (baseList, bool) {
	h, ok := b.handle(dim, s)
	if !ok {
		return baseList{}, false
	}
	l, ok := b.lists[baseListKey{uint8(dim), h}]
	return l, ok
}

// writeBase writes the base of the operations recs yields (oldest first,
// each once, live) to f after its first off bytes (which prefix wrote,
// given the table and the named ids), with the footer; the caller adds
// the checksum. recs is called twice and must yield the same both times.
func writeBase(f *os.File, recs func(yield func(*opRec) bool), prefix func(strs []string, kinds int, named []opNamed, termDur time.Duration) (int64, error)) error {
	// First pass: the strings, the sizes of the lists and buckets.
	var kinds, names []string
	kindSeen, nameSeen := map[string]bool{}, map[string]bool{}
	type listName struct {
		dim int
		s   string
	}
	sizes := map[listName]int{}
	n := 0
	var named []opNamed
	var termDur time.Duration
	fine := make([]uint32, baseBucketsMax)
	for r := range recs {
		for dim, s := range r.vals {
			if s == "" {
				continue
			}
			seen, list := nameSeen, &names
			if dim < 2 {
				seen, list = kindSeen, &kinds
			}
			if !seen[s] {
				seen[s] = true
				*list = append(*list, s)
			}
			sizes[listName{dim, s}]++
		}
		if r.name != "" {
			named = append(named, opNamed{uint32(n), r.name})
		} else {
			fine[bucketOf(&r.key, baseBucketsMax)]++
		}
		if commands.OpStatus(r.vals[1]).Terminal() {
			termDur += r.duration
		}
		n++
	}
	if len(kinds) >= 1<<16-1 {
		return errors.New("too many types and statuses")
	}
	slices.Sort(kinds)
	slices.Sort(names)
	strs := append(append([]string{""}, kinds...), names...)
	kindOf, nameOf := make(map[string]uint32, len(kinds)), make(map[string]uint32, len(names))
	for j, s := range kinds {
		kindOf[s] = uint32(1 + j)
	}
	for j, s := range names {
		nameOf[s] = uint32(1 + len(kinds) + j)
	}
	handles := func(r *opRec) (h [len(indexDims)]uint32) {
		for dim, s := range r.vals {
			if s == "" {
				continue
			}
			if dim < 2 {
				h[dim] = kindOf[s]
			} else {
				h[dim] = nameOf[s]
			}
		}
		return h
	}
	nb := 1
	for nb*baseBucketOps < n && nb < baseBucketsMax {
		nb *= 2
	}
	off, err := prefix(strs, len(kinds), named, termDur)
	if err != nil {
		return err
	}
	// The sections' places.
	slotsOff := (off + 7) &^ 7
	idsOff := slotsOff + int64(n)*baseSlotSize
	bucketCount := make([]uint32, nb+1)
	for j, c := range fine {
		bucketCount[j&(nb-1)+1] += c
	}
	for j := 1; j <= nb; j++ {
		bucketCount[j] += bucketCount[j-1]
	}
	nids := int64(bucketCount[nb])
	bucketsOff := idsOff + nids*baseIDSize
	listsOff := bucketsOff + int64(nb+1)*4
	keys := slices.SortedFunc(maps.Keys(sizes), func(a, b listName) int {
		if c := cmp.Compare(a.dim, b.dim); c != 0 {
			return c
		}
		return strings.Compare(a.s, b.s)
	})
	type listOut struct {
		at  int // its next entry
		buf []byte
	}
	outs := make(map[listName]*listOut, len(keys))
	at := 0
	dir := make([]byte, 0, len(keys)*baseDirSize)
	for _, k := range keys {
		h := kindOf[k.s]
		if k.dim >= 2 {
			h = nameOf[k.s]
		}
		o := &listOut{at: at}
		outs[k] = o
		le := binary.LittleEndian
		dir = le.AppendUint32(dir, uint32(k.dim))
		dir = le.AppendUint32(dir, h)
		dir = le.AppendUint64(dir, uint64(at))
		dir = le.AppendUint64(dir, uint64(sizes[k]))
		at += sizes[k]
	}
	dirOff := listsOff + int64(at)*baseEntrySize
	// Second pass: the slots in order; the ids and list entries into
	// small buffers per bucket and list, written where they go.
	const flushAt = 512
	var werr error
	writeAt := func(p []byte, off int64) {
		if werr == nil {
			_, werr = f.WriteAt(p, off)
		}
	}
	slotsW := bufio.NewWriterSize(io.NewOffsetWriter(f, slotsOff), 1<<16)
	idNext := slices.Clone(bucketCount[:nb])
	idBufs := make([][]byte, nb)
	flushIDs := func(bk int) {
		p := idBufs[bk]
		writeAt(p, idsOff+int64(idNext[bk])*baseIDSize)
		idNext[bk] += uint32(len(p) / baseIDSize)
		idBufs[bk] = p[:0]
	}
	flushList := func(o *listOut) {
		writeAt(o.buf, listsOff+int64(o.at)*baseEntrySize)
		o.at += len(o.buf) / baseEntrySize
		o.buf = o.buf[:0]
	}
	var slot []byte
	i := 0
	for r := range recs {
		if i >= n {
			return errors.New("records changed between passes")
		}
		h := handles(r)
		br := baseRec{key: r.key, rev: r.rev, created: r.created, completed: r.completed, duration: r.duration, h: h}
		slot = appendBaseRec(slot[:0], &br)
		if _, err := slotsW.Write(slot); err != nil {
			return err
		}
		if r.name == "" {
			bk := bucketOf(&r.key, nb)
			idBufs[bk] = binary.LittleEndian.AppendUint32(append(idBufs[bk], r.key[:]...), uint32(i))
			if len(idBufs[bk]) >= flushAt {
				flushIDs(bk)
			}
		}
		for dim, s := range r.vals {
			if s == "" {
				continue
			}
			o := outs[listName{dim, s}]
			o.buf = appendBaseEntry(o.buf, uint32(i), &h)
			if len(o.buf) >= flushAt {
				flushList(o)
			}
		}
		i++
	}
	if i != n {
		return errors.New("records changed between passes")
	}
	if err := slotsW.Flush(); err != nil {
		return err
	}
	for bk := range idBufs {
		flushIDs(bk)
	}
	for _, o := range outs {
		flushList(o)
	}
	le := binary.LittleEndian
	var bks []byte
	for _, c := range bucketCount {
		bks = le.AppendUint32(bks, c)
	}
	writeAt(bks, bucketsOff)
	writeAt(dir, dirOff)
	var foot []byte
	for _, v := range [...]int64{slotsOff, int64(n), idsOff, int64(nb), bucketsOff, listsOff, dirOff, int64(len(keys)), off} {
		foot = le.AppendUint64(foot, uint64(v))
	}
	writeAt(foot, dirOff+int64(len(dir)))
	return werr
}

// encodeBaseTables writes the tables of a base's prefix that openBase
// reads: the string table (kinds of them the types and statuses), the
// named ids and the terminal operations' summed duration.
func encodeBaseTables(e *cacheEncoder, strs []string, kinds int, named []opNamed, termDur time.Duration) {
	e.uvarint(uint64(len(strs)))
	e.uvarint(uint64(kinds))
	for _, s := range strs {
		e.str(s)
	}
	e.uvarint(uint64(len(named)))
	for _, n := range named {
		e.uvarint(uint64(n.slot))
		e.str(n.id)
	}
	e.varint(int64(termDur))
}

// opNamed is an id not of volumed's form and its slot.
type opNamed struct {
	slot uint32
	id   string
}

// crcFile returns the CRC-32C of f's first n bytes.
func crcFile(f *os.File, n int64) (uint32, error) {
	sum := crc32.New(kvCacheCRC)
	if _, err := io.Copy(sum, io.NewSectionReader(f, 0, n)); err != nil {
		return 0, err
	}
	return sum.Sum32(), nil
}

// openBase reads the tables of the base in f, whose prefix (up to its
// first section) d has read up to the string table: the table, the named
// ids, the footer; it checks the checksum and every slot's order and
// values. size is the file's size, the checksum's 4 bytes included. The
// slots of dead (a bitmap; nil: none) are left out of its counters and
// of c's revisions.
func openBase(f *os.File, path string, size int64, d *cacheDecoder, c *kvCache, dead []uint64) (*opBase, error) {
	if size < baseFooter+4 {
		return nil, errors.New("truncated")
	}
	le := binary.LittleEndian
	foot := make([]byte, baseFooter+4)
	if _, err := f.ReadAt(foot, size-int64(len(foot))); err != nil {
		return nil, err
	}
	want, err := crcFile(f, size-4)
	if err != nil {
		return nil, err
	}
	if le.Uint32(foot[baseFooter:]) != want {
		return nil, errors.New("bad checksum")
	}
	var v [9]int64
	for j := range v {
		v[j] = int64(le.Uint64(foot[8*j:]))
	}
	b := &opBase{f: f, path: path, slotsOff: v[0], n: int(v[1]), idsOff: v[2], listsOff: v[5],
		kindOf: map[string]uint32{}, nameOf: map[string]uint32{}, named: map[string]uint32{}, nameAt: map[uint32]string{},
		lists: map[baseListKey]baseList{}, stats: newStats()}
	nb, bucketsOff, dirOff, nlists, prefixEnd := v[3], v[4], v[6], v[7], v[8]
	end := size - int64(len(foot))
	if b.n < 0 || nb <= 0 || nb&(nb-1) != 0 || nlists < 0 || prefixEnd > b.slotsOff || b.slotsOff%8 != 0 ||
		b.idsOff != b.slotsOff+int64(b.n)*baseSlotSize || bucketsOff < b.idsOff || b.listsOff != bucketsOff+(nb+1)*4 ||
		dirOff < b.listsOff || dirOff+nlists*baseDirSize != end || (dirOff-b.listsOff)%baseEntrySize != 0 {
		return nil, errors.New("bad footer")
	}
	// The prefix's rest: the string table, the named ids, the terminal
	// operations' summed duration.
	nstr, kinds := d.count(1), int(d.uvarint())
	if nstr == 0 || kinds >= nstr {
		return nil, cmp.Or(d.err, errors.New("bad string table"))
	}
	b.strs = make([]string, nstr)
	for h := range b.strs {
		b.strs[h] = d.str()
		switch {
		case h == 0:
		case h <= kinds:
			b.kindOf[b.strs[h]] = uint32(h)
		default:
			b.nameOf[b.strs[h]] = uint32(h)
		}
	}
	for range d.count(2) {
		i, id := uint32(d.uvarint()), d.str()
		if int(i) >= b.n || id == "" {
			return nil, cmp.Or(d.err, errors.New("bad named id"))
		}
		b.named[id], b.nameAt[i] = i, id
	}
	termDur := time.Duration(d.varint())
	if d.err != nil {
		return nil, d.err
	}
	if d.remaining() != 0 {
		return nil, errors.New("trailing bytes")
	}
	bks := make([]byte, (nb+1)*4)
	if _, err := f.ReadAt(bks, bucketsOff); err != nil {
		return nil, err
	}
	b.buckets = make([]uint32, nb+1)
	for j := range b.buckets {
		b.buckets[j] = le.Uint32(bks[4*j:])
		if j > 0 && b.buckets[j] < b.buckets[j-1] {
			return nil, errors.New("bad buckets")
		}
	}
	if int64(b.buckets[nb])*baseIDSize != bucketsOff-b.idsOff || b.buckets[0] != 0 {
		return nil, errors.New("bad buckets")
	}
	dir := make([]byte, nlists*baseDirSize)
	if _, err := f.ReadAt(dir, dirOff); err != nil {
		return nil, err
	}
	nentries := int((dirOff - b.listsOff) / baseEntrySize)
	for j := range int(nlists) {
		p := dir[j*baseDirSize:]
		k := baseListKey{uint8(le.Uint32(p)), le.Uint32(p[4:])}
		l := baseList{int(le.Uint64(p[8:])), int(le.Uint64(p[16:]))}
		if int(k.dim) >= len(indexDims) || k.h == 0 || int(k.h) >= nstr || (k.dim < 2) != (int(k.h) <= kinds) ||
			l.start < 0 || l.n <= 0 || l.start+l.n > nentries {
			return nil, fmt.Errorf("bad list %d", j)
		}
		b.lists[k] = l
		switch k.dim {
		case 0:
			b.stats.ByType[commands.OpType(b.strs[k.h])] += int64(l.n)
		case 1:
			st := commands.OpStatus(b.strs[k.h])
			b.stats.ByStatus[st] += int64(l.n)
			if st.Terminal() {
				b.stats.Terminal += int64(l.n)
			}
		}
	}
	b.stats.Total, b.stats.TerminalDuration = int64(b.n), termDur
	if w := (b.n + 63) / 64; len(dead) > w || (len(dead) == w && b.n%64 != 0 && dead[w-1]>>(b.n%64) != 0) {
		return nil, errors.New("dead slots past the base")
	}
	// Every slot: in order, its values in the table, its revision noted
	// (a dead one's taken out of the counters).
	var prev baseRec
	var bad error
	b.slotsUp(func(i uint32, r *baseRec) bool {
		for dim, h := range r.h {
			if int(h) >= nstr || (h != 0 && (dim < 2) != (int(h) <= kinds)) {
				bad = fmt.Errorf("operation %d: bad string %d", i, h)
				return false
			}
		}
		if r.h[1] == 0 || r.rev == 0 {
			bad = fmt.Errorf("operation %d: bad entry", i)
			return false
		}
		if i > 0 {
			c := cmp.Compare(prev.created, r.created)
			if c == 0 {
				c = strings.Compare(b.idOf(i-1, &prev.key), b.idOf(i, &r.key))
			}
			if c >= 0 {
				bad = fmt.Errorf("operation %d: out of order", i)
				return false
			}
		}
		switch {
		case isDeadIn(dead, i):
			b.uncount(&b.stats, r)
		case c.note(r.rev):
			c.maxKey = kvOpPrefix + b.idOf(i, &r.key)
		}
		prev = *r
		return true
	})
	if bad != nil {
		return nil, bad
	}
	return b, nil
}

// uncount takes slot r out of the counters s.
func (b *opBase) uncount(s *Stats, r *baseRec) {
	typ, status := commands.OpType(b.str(r.h[0])), commands.OpStatus(b.str(r.h[1]))
	s.Total--
	s.ByType[typ]--
	s.ByStatus[status]--
	if status.Terminal() {
		s.Terminal--
		s.TerminalDuration -= r.duration
	}
}

// isDeadIn reports whether bit i of bitmap dead is set.
func isDeadIn(dead []uint64, i uint32) bool {
	return int(i/64) < len(dead) && dead[i/64]&(1<<(i%64)) != 0
}

// close closes the base's file.
func (b *opBase) close() {
	if b != nil {
		_ = b.f.Close()
	}
}
