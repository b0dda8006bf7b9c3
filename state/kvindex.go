package state

import (
	"bytes"
	"cmp"
	"iter"
	"slices"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
)

// opIndex is an in-memory index of the embedded store's operations (the
// delta of opLayers, in front of its base on disk; all of them until the
// first base is written): per
// operation, only what the listings, the prune and the counters need (its
// id, revision, times and interned field values: a 56-byte slot holding
// the id's 16 bytes, 8 to 16 bytes of idTable and a 4-byte entry per list
// it is in, 3 to 5 of them: about 84 bytes at a million); the records
// themselves stay in the bucket and are read from it. It is not safe for concurrent use:
// KV.mu guards it.
type opIndex struct {
	slots []opSlot
	free  []uint32          // unused slots
	byID  idTable           // operation id → slot
	named map[uint32]string // slot → id, of ids not of volumed's form (opKey)
	// wide holds what a live slot's fields cannot (slotWide).
	wide map[uint32]wideSlot
	// kinds interns the types and statuses, names the other indexed
	// values (volume, VM, requester).
	kinds, names interner
	// lists holds, per index name (see indexNames), the slots of its
	// operations ordered oldest first by (created, id). There is no list
	// of every operation: each live one is in exactly one status list,
	// which together are that list (statusLists).
	lists map[string][]uint32
	stats Stats // without Writes
	// deferred: put and remove leave the lists and counters to
	// endDeferred, which makes them at once (a start reading every
	// record).
	deferred bool
}

// opSlot is what memory keeps of one operation, 56 bytes. A slot whose
// status is 0 records only the revision of an operation this process
// deleted, until the watcher delivers the delete.
//
// Its times are exact: the completion's score as created plus span (µs),
// the duration as span µs plus took ns. An operation whose times do not
// fit (completed more than 71 minutes after its creation or before it, a
// duration more than 32 µs off its span or without a completion) has
// them in opIndex.wide, as has one whose type or status is numbered
// kindWide or more.
type opSlot struct {
	key     opKey
	rev     uint64
	created int64  // opScore of CreatedAt
	span    uint32 // opScore of completedAt less created (slotDone)
	// Interned values (0: none) of the indexed fields: names numbers.
	volume, vm, by uint32
	took           int16 // duration less span µs, in ns (slotTook)
	// Interned type and status: kinds numbers, kindWide when the slot is
	// wide.
	typ, status uint8
	flags       uint8
}

// opSlot.flags.
const (
	slotNamed = 1 << iota // the id is in opIndex.named, not in key
	slotWide              // the times, type and status are in opIndex.wide
	slotDone              // completed is created + span (otherwise 0)
	slotTook              // the duration is span µs + took ns (otherwise 0)
)

// kindWide is a wide slot's type and status.
const kindWide = 255

// wideKind is what a wide slot's fields hold of kinds number h: 0 for
// none (a status 0 is no live operation), kindWide otherwise.
func wideKind(h uint32) uint8 {
	if h == 0 {
		return 0
	}
	return kindWide
}

// wideSlot is a wide slot's times, type and status (kinds numbers).
type wideSlot struct {
	completed   int64
	duration    time.Duration
	typ, status uint32
}

func (s *opSlot) named() bool { return s.flags&slotNamed != 0 }

func newOpIndex() *opIndex {
	return &opIndex{byID: newIDTable(0), named: make(map[uint32]string), wide: make(map[uint32]wideSlot),
		lists: make(map[string][]uint32), kinds: newInterner(), names: newInterner(), stats: newStats()}
}

// kindsOf returns slot i's type and status (kinds numbers).
func (x *opIndex) kindsOf(i uint32) (typ, status uint32) {
	s := &x.slots[i]
	if s.flags&slotWide != 0 {
		w := x.wide[i]
		return w.typ, w.status
	}
	return uint32(s.typ), uint32(s.status)
}

// times returns slot i's completion score (0: none) and duration.
func (x *opIndex) times(i uint32) (completed int64, duration time.Duration) {
	s := &x.slots[i]
	if s.flags&slotWide != 0 {
		w := x.wide[i]
		return w.completed, w.duration
	}
	if s.flags&slotDone != 0 {
		completed = s.created + int64(s.span)
	}
	if s.flags&slotTook != 0 {
		duration = time.Duration(s.span)*time.Microsecond + time.Duration(s.took)
	}
	return completed, duration
}

// set makes slot i hold these values, in its fields where they fit
// and in x.wide otherwise. It keeps the slot's key, revision and
// slotNamed.
func (x *opIndex) set(i uint32, typ, status uint32, volume, vm, by uint32, created, completed int64, duration time.Duration) {
	s := &x.slots[i]
	*s = opSlot{key: s.key, rev: s.rev, created: created, volume: volume, vm: vm, by: by, flags: s.flags & slotNamed}
	fits := typ < kindWide && status < kindWide
	if fits && completed != 0 {
		d := completed - created
		fits = d >= 0 && d <= 1<<32-1
		s.span, s.flags = uint32(d), s.flags|slotDone
	}
	if fits && duration != 0 {
		t := duration - time.Duration(s.span)*time.Microsecond
		fits = completed != 0 && t >= -1<<15 && t < 1<<15
		s.took, s.flags = int16(t), s.flags|slotTook
	}
	if !fits {
		*s = opSlot{key: s.key, rev: s.rev, created: created, volume: volume, vm: vm, by: by,
			typ: wideKind(typ), status: wideKind(status), flags: s.flags&slotNamed | slotWide}
		x.wide[i] = wideSlot{completed: completed, duration: duration, typ: typ, status: status}
		return
	}
	s.typ, s.status = uint8(typ), uint8(status)
}

// handles returns slot i's interned values, in the order of indexDims:
// type and status kinds numbers, the others names numbers.
func (x *opIndex) handles(i uint32) [len(indexDims)]uint32 {
	s := &x.slots[i]
	typ, status := x.kindsOf(i)
	return [...]uint32{typ, status, s.volume, s.vm, s.by}
}

// interner returns the interner of dimension dim (of indexDims).
func (x *opIndex) interner(dim int) *interner {
	if dim < 2 {
		return &x.kinds
	}
	return &x.names
}

// rev returns the revision memory holds for id (0: none), and the slot's
// status when it is live.
func (x *opIndex) rev(id string) (uint64, commands.OpStatus, bool) {
	i, ok := x.byID.get(x, id)
	if !ok {
		return 0, "", false
	}
	s := &x.slots[i]
	_, status := x.kindsOf(i)
	return s.rev, commands.OpStatus(x.kinds.str(status)), s.status != 0
}

// opFields are what the index keeps of an operation: its indexed values,
// as strings or as pieces of its JSON record (copied only when new to the
// index), and its times.
type opFields[S ~string | ~[]byte] struct {
	typ, status, volume, vm, by S
	created, completed          int64 // opScore; completed of a terminal operation
	duration                    time.Duration
}

// fieldsOf returns the fields the index keeps of op.
func fieldsOf(op *commands.Operation) opFields[string] {
	f := opFields[string]{typ: string(op.Type), status: string(op.Status), volume: op.VolumeID, vm: op.VM(),
		by: op.RequestedBy}
	f.created, f.completed, f.duration = opTimes(op)
	return f
}

// opTimes returns the times the index keeps of op: the scores of its
// creation and, when terminal, its completion, and its duration.
func opTimes(op *commands.Operation) (created, completed int64, duration time.Duration) {
	if op.Status.Terminal() {
		completed = opScore(completedAt(op))
	}
	return opScore(op.CreatedAt), completed, op.Duration()
}

// putNewer records f as operation id's at revision rev unless the index
// holds that revision of it or a later one, and reports whether it did:
// one look-up of id, for the watcher.
func putNewer[S ~string | ~[]byte](x *opIndex, id string, rev uint64, f *opFields[S]) bool {
	i, held := x.byID.get(x, id)
	if held && x.slots[i].rev >= rev {
		return false
	}
	putSlot(x, i, held, rev, id, f)
	return true
}

// putSlot records f at revision rev as operation id's, replacing what its
// slot i held if held.
func putSlot[S ~string | ~[]byte](x *opIndex, i uint32, held bool, rev uint64, id string, f *opFields[S]) {
	if held {
		x.unindexSlot(i)
	} else {
		i = x.alloc()
		key, canon := parseOpKey(id)
		x.slots[i] = opSlot{key: key}
		if !canon {
			// Its own copy: id may be part of a larger string (the
			// watcher's is the message's subject).
			x.slots[i].flags = slotNamed
			x.named[i] = strings.Clone(id)
		}
		x.byID.add(x, i)
	}
	x.slots[i].rev = rev
	x.set(i, addName(&x.kinds, f.typ), addName(&x.kinds, f.status), addName(&x.names, f.volume),
		addName(&x.names, f.vm), addName(&x.names, f.by), f.created, f.completed, f.duration)
	// A record without a status (written by hand) is no live operation,
	// as its slot says (unindexSlot, the cache): in no list.
	if !x.deferred && x.slots[i].status != 0 {
		x.index(i, 1)
	}
}

// tombstone unindexes id but keeps its revision rev, so that a stale put
// of that revision or an older one is recognised as such.
func (x *opIndex) tombstone(id string, rev uint64) {
	x.unindex(id)
	if i, ok := x.byID.get(x, id); ok {
		x.slots[i].rev = rev
	}
}

// remove forgets id.
func (x *opIndex) remove(id string) {
	x.unindex(id)
	i, ok := x.byID.get(x, id)
	if !ok {
		return
	}
	x.byID.del(x, id)
	x.slots[i] = opSlot{}
	delete(x.named, i)
	delete(x.wide, i)
	x.free = append(x.free, i) // reused by new operations
}

// unindex takes id's live slot, if any, out of the lists and counters
// and makes it a tombstone at the same revision.
func (x *opIndex) unindex(id string) {
	if i, ok := x.byID.get(x, id); ok {
		x.unindexSlot(i)
	}
}

// unindexSlot is unindex of slot i. Its interned values are let go;
// a record without a status leaves its slot so too.
func (x *opIndex) unindexSlot(i uint32) {
	s := &x.slots[i]
	live := s.status != 0
	if live && !x.deferred {
		x.index(i, -1)
	}
	h := x.handles(i)
	for dim, v := range h {
		x.interner(dim).drop(v)
	}
	delete(x.wide, i)
	*s = opSlot{key: s.key, rev: s.rev, flags: s.flags & slotNamed}
}

// endDeferred makes the lists and counters of the live slots, which put
// and remove left out while deferred, and keeps them from then on.
func (x *opIndex) endDeferred() {
	if !x.deferred {
		return
	}
	x.deferred = false
	all := make([]uint32, 0, len(x.slots)-len(x.free))
	for i := range x.slots {
		if x.slots[i].status != 0 {
			all = append(all, uint32(i))
			x.count(uint32(i), 1)
		}
	}
	// Mostly in order already: the records come in the order written.
	if !slices.IsSortedFunc(all, x.compare) {
		slices.SortFunc(all, x.compare)
	}
	x.setLists(slices.Values(all))
}

// setLists makes the lists of the index, which has none, from all, its
// live slots oldest first: each list by appending, of the size it needs.
func (x *opIndex) setLists(all iter.Seq[uint32]) {
	var sizes [len(indexDims)][]int // dimension → number → operations
	for dim := range sizes {
		sizes[dim] = make([]int, len(x.interner(dim).strs))
	}
	for i := range all {
		for dim, h := range x.handles(i) {
			if h != 0 {
				sizes[dim][h]++
			}
		}
	}
	var lists [len(indexDims)][][]uint32
	for dim := range lists {
		lists[dim] = make([][]uint32, len(sizes[dim]))
		for h, size := range sizes[dim] {
			if size > 0 {
				lists[dim][h] = make([]uint32, 0, size)
			}
		}
	}
	for i := range all {
		for dim, h := range x.handles(i) {
			if h != 0 {
				lists[dim][h] = append(lists[dim][h], i)
			}
		}
	}
	for dim, byValue := range lists {
		for h, l := range byValue {
			if len(l) > 0 {
				x.lists[indexDims[dim]+":"+x.interner(dim).strs[h]] = l
			}
		}
	}
}

// grow makes room for n more operations.
func (x *opIndex) grow(n int) {
	x.slots = slices.Grow(x.slots, n)
	size := len(x.byID.cells)
	for size < 2*(x.byID.len()+n) {
		size *= 2
	}
	if size > len(x.byID.cells) {
		x.byID.resize(x, size)
	}
}

func (x *opIndex) alloc() uint32 {
	if n := len(x.free); n > 0 {
		i := x.free[n-1]
		x.free = x.free[:n-1]
		return i
	}
	x.slots = append(x.slots, opSlot{})
	return uint32(len(x.slots) - 1)
}

// compare orders slots oldest first by (created, id).
func (x *opIndex) compare(a, b uint32) int {
	sa, sb := &x.slots[a], &x.slots[b]
	if c := cmp.Compare(sa.created, sb.created); c != 0 {
		return c
	}
	if !sa.named() && !sb.named() {
		return bytes.Compare(sa.key[:], sb.key[:])
	}
	return strings.Compare(x.idOf(a), x.idOf(b))
}

// listNames names the lists slot i belongs to.
func (x *opIndex) listNames(i uint32) []string {
	h := x.handles(i)
	return indexNames(x.kinds.str(h[0]), x.kinds.str(h[1]), x.names.str(h[2]), x.names.str(h[3]), x.names.str(h[4]), false)
}

// index adds (sign 1) or removes (sign -1) live slot i from its lists and
// the counters.
func (x *opIndex) index(i uint32, sign int64) {
	for _, name := range x.listNames(i) {
		l := x.lists[name]
		// Most writes are of the newest operation: look at the end first.
		var at int
		var found bool
		if n := len(l); n > 0 && x.compare(l[n-1], i) < 0 {
			at = n
		} else {
			at, found = slices.BinarySearchFunc(l, i, x.compare)
		}
		switch {
		case sign > 0 && !found:
			x.lists[name] = slices.Insert(l, at, i)
		case sign < 0 && found && len(l) == 1:
			delete(x.lists, name)
		case sign < 0 && found:
			l = slices.Delete(l, at, at+1)
			if cap(l) > 64 && len(l) < cap(l)/4 {
				l = slices.Clone(l) // give back what pruning freed
			}
			x.lists[name] = l
		}
	}
	x.count(i, sign)
}

// count adds (sign 1) or removes (sign -1) live slot i from the counters.
func (x *opIndex) count(i uint32, sign int64) {
	t, st := x.kindsOf(i)
	typ, status := commands.OpType(x.kinds.str(t)), commands.OpStatus(x.kinds.str(st))
	x.stats.Total += sign
	x.stats.ByType[typ] += sign
	x.stats.ByStatus[status] += sign
	if status.Terminal() {
		_, duration := x.times(i)
		x.stats.Terminal += sign
		x.stats.TerminalDuration += time.Duration(sign) * duration
	}
}

// statusLists returns the status lists: every live slot is in one.
func (x *opIndex) statusLists() [][]uint32 {
	var ls [][]uint32
	for st, n := range x.stats.ByStatus {
		if n > 0 {
			ls = append(ls, x.lists["status:"+string(st)])
		}
	}
	return ls
}

// ascending yields the live slots oldest first, merging the status lists.
func (x *opIndex) ascending(yield func(uint32) bool) {
	ls := x.statusLists()
	pos := make([]int, len(ls))
	for {
		next := -1
		for j, l := range ls {
			if pos[j] < len(l) && (next < 0 || x.compare(l[pos[j]], ls[next][pos[next]]) < 0) {
				next = j
			}
		}
		if next < 0 || !yield(ls[next][pos[next]]) {
			return
		}
		pos[next]++
	}
}

// opMatch is a Filter in interned values; ok is false when a value it
// selects by is held by no operation.
type opMatch struct {
	typ, status, volume, vm, by uint32
	ok                          bool
}

func (x *opIndex) match(f Filter) opMatch {
	m := opMatch{ok: true}
	for _, v := range [...]struct {
		h *uint32
		n *interner
		s string
	}{{&m.typ, &x.kinds, string(f.Type)}, {&m.status, &x.kinds, string(f.Status)}, {&m.volume, &x.names, f.VolumeID},
		{&m.vm, &x.names, f.VMID}, {&m.by, &x.names, f.RequestedBy}} {
		if v.s == "" {
			continue
		}
		h, ok := v.n.lookup(v.s)
		*v.h, m.ok = h, m.ok && ok
	}
	return m
}

// matches reports whether slot i is live and matches m.
func (x *opIndex) matches(m opMatch, i uint32) bool {
	s := &x.slots[i]
	if s.status == 0 || (m.volume != 0 && s.volume != m.volume) || (m.vm != 0 && s.vm != m.vm) ||
		(m.by != 0 && s.by != m.by) {
		return false
	}
	typ, status := x.kindsOf(i)
	return (m.typ == 0 || typ == m.typ) && (m.status == 0 || status == m.status)
}

// hits returns up to limit operations matching f (0: no limit) newest
// first, strictly after the cursor after (nil: from the newest), walking
// the smallest list f selects, or the status lists merged when it selects
// by nothing; more reports whether another one follows.
func (x *opIndex) hits(f Filter, after *opRef, limit int) (hits []opHit, more bool) {
	m := x.match(f)
	if !m.ok {
		return nil, false
	}
	var walk [][]uint32
	if names := filterIndexes(f); names[0] == "all" {
		walk = x.statusLists()
	} else {
		for i, name := range names {
			if l := x.lists[name]; i == 0 || len(l) < len(walk[0]) {
				walk = [][]uint32{l}
			}
		}
	}
	// pos[j] is where walk[j] continues, downwards.
	pos := make([]int, len(walk))
	var k opKey
	var canon bool
	if after != nil {
		k, canon = parseOpKey(after.id)
	}
	for j, l := range walk {
		pos[j] = len(l)
		if after != nil {
			pos[j], _ = slices.BinarySearchFunc(l, *after, func(i uint32, r opRef) int {
				if c := cmp.Compare(x.slots[i].created, r.score); c != 0 {
					return c
				}
				return x.compareID(i, r.id, k, canon)
			})
		}
	}
	for {
		next := -1
		for j, l := range walk {
			if pos[j] > 0 && (next < 0 || x.compare(l[pos[j]-1], walk[next][pos[next]-1]) > 0) {
				next = j
			}
		}
		if next < 0 {
			return hits, false
		}
		pos[next]--
		i := walk[next][pos[next]]
		if !x.matches(m, i) {
			continue
		}
		if limit > 0 && len(hits) == limit {
			return hits, true
		}
		hits = append(hits, opHit{id: x.idOf(i), rev: x.slots[i].rev, score: x.slots[i].created})
	}
}

// expired returns the ids and revisions of up to limit (0: no limit)
// terminal operations completed before the score before, oldest created
// first (an operation completed before a time was created before it),
// but the held ones, and which of them the retention may hold
// (MayHold): it reads their records.
func (x *opIndex) expired(before int64, limit int, held map[string]struct{}) (ids []string, revs []uint64, mayHold []bool) {
	for _, st := range commands.OpStatuses {
		if !st.Terminal() {
			continue
		}
		for _, i := range x.lists["status:"+string(st)] {
			s := &x.slots[i]
			if s.created >= before || (limit > 0 && len(ids) >= limit) {
				break
			}
			if completed, _ := x.times(i); completed >= before {
				continue
			}
			typ, _ := x.kindsOf(i)
			id, may := x.idOf(i), MayHold(commands.OpType(x.kinds.str(typ)))
			if _, ok := held[id]; ok && may {
				continue
			}
			ids, revs, mayHold = append(ids, id), append(revs, s.rev), append(mayHold, may)
		}
	}
	return ids, revs, mayHold
}

// interner gives each distinct string a small number, counting its
// users so that a string no operation holds any more is forgotten.
// Number 0 is "".
type interner struct {
	ids   map[string]uint32
	strs  []string
	users []int64
	free  []uint32
}

func newInterner() interner {
	return interner{ids: make(map[string]uint32), strs: []string{""}, users: []int64{0}}
}

// addName returns the number of s in n and counts one more user of it; s
// is copied when new.
func addName[S ~string | ~[]byte](n *interner, s S) uint32 {
	if len(s) == 0 {
		return 0
	}
	h, ok := n.ids[string(s)]
	if !ok {
		str := strings.Clone(string(s))
		if k := len(n.free); k > 0 {
			h, n.free = n.free[k-1], n.free[:k-1]
			n.strs[h] = str
		} else {
			h = uint32(len(n.strs))
			n.strs, n.users = append(n.strs, str), append(n.users, 0)
		}
		n.ids[str] = h
	}
	n.users[h]++
	return h
}

// drop counts one user less of number h.
func (n *interner) drop(h uint32) {
	if h == 0 {
		return
	}
	if n.users[h]--; n.users[h] == 0 {
		delete(n.ids, n.strs[h])
		n.strs[h] = ""
		n.free = append(n.free, h)
	}
}

func (n *interner) lookup(s string) (uint32, bool) {
	h, ok := n.ids[s]
	return h, ok
}

func (n *interner) str(h uint32) string { return n.strs[h] }

// kvRecentOps is how many records the embedded store keeps as JSON: the
// last ones written or read from the bucket's watcher, which the engine's
// own lookups (an operation's volume's latest operation) and the first
// pages of listings mostly ask for. About 1 KB each.
const kvRecentOps = 4096

// recentOps keeps the JSON of the last kvRecentOps operation revisions
// applied, first in first out. A revision names one value of a key, so a
// record held at the revision the index holds is the record.
type recentOps struct {
	byID map[string]recentOp
	ring []recentRef // insertion order; next is the oldest once full
	next int
}

type recentOp struct {
	rev uint64
	raw []byte
}

type recentRef struct {
	id  string
	rev uint64
}

func newRecentOps(n int) *recentOps {
	return &recentOps{byID: make(map[string]recentOp, n), ring: make([]recentRef, 0, n)}
}

// put keeps raw as id's record at revision rev, forgetting the oldest
// one kept when full.
func (r *recentOps) put(id string, rev uint64, raw []byte) {
	ref := recentRef{id, rev}
	if len(r.ring) < cap(r.ring) {
		r.ring = append(r.ring, ref)
	} else {
		old := r.ring[r.next]
		if e, ok := r.byID[old.id]; ok && e.rev == old.rev {
			delete(r.byID, old.id)
		}
		r.ring[r.next] = ref
		r.next = (r.next + 1) % len(r.ring)
	}
	r.byID[id] = recentOp{rev, raw}
}

// forget drops id's record.
func (r *recentOps) forget(id string) { delete(r.byID, id) }

// get returns id's record if it is kept at revision rev.
func (r *recentOps) get(id string, rev uint64) ([]byte, bool) {
	e, ok := r.byID[id]
	return e.raw, ok && e.rev == rev
}
