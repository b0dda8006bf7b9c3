package state

import (
	"bytes"
	"cmp"
	"slices"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
)

// opIndex is the in-memory index of the embedded store's operations: per
// operation, only what the listings, the prune and the counters need (its
// id, revision, times and interned field values: a 72-byte slot holding
// the id's 16 bytes, 4 to 8 bytes of idTable and a 4-byte entry per index
// it is in, about 100 bytes); the records themselves stay in the bucket
// and are read from it. It is not safe for concurrent use: KV.mu guards
// it.
type opIndex struct {
	slots []opSlot
	free  []uint32          // unused slots
	byID  idTable           // operation id → slot
	named map[uint32]string // slot → id, of ids not of volumed's form (opKey)
	names interner
	// lists holds, per index name (see indexNames), the slots of its
	// operations ordered oldest first by (created, id).
	lists map[string][]uint32
	stats Stats // without Writes
	// deferred: put and remove leave the lists and counters to
	// endDeferred, which makes them at once (a start reading every
	// record).
	deferred bool
}

// opSlot is what memory keeps of one operation. A slot whose status is 0
// records only the revision of an operation this process deleted, until
// the watcher delivers the delete.
type opSlot struct {
	key       opKey
	named     bool // the id is in opIndex.named, not in key
	rev       uint64
	created   int64 // opScore of CreatedAt
	completed int64 // opScore of completedAt, for a terminal operation
	duration  time.Duration
	// Interned values (0: none) of the indexed fields.
	typ, status, volume, vm, by uint32
}

// handles are the slot's interned values, in the order of indexDims.
func (s *opSlot) handles() [len(indexDims)]*uint32 {
	return [...]*uint32{&s.typ, &s.status, &s.volume, &s.vm, &s.by}
}

func newOpIndex() *opIndex {
	return &opIndex{byID: newIDTable(0), named: make(map[uint32]string), lists: make(map[string][]uint32),
		names: newInterner(), stats: newStats()}
}

// rev returns the revision memory holds for id (0: none), and the slot's
// status when it is live.
func (x *opIndex) rev(id string) (uint64, commands.OpStatus, bool) {
	i, ok := x.byID.get(x, id)
	if !ok {
		return 0, "", false
	}
	s := &x.slots[i]
	return s.rev, commands.OpStatus(x.names.str(s.status)), s.status != 0
}

// len counts the live operations.
func (x *opIndex) len() int { return int(x.stats.Total) }

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

// put records op at revision rev, replacing what id held.
func (x *opIndex) put(rev uint64, op *commands.Operation) {
	i, held := x.byID.get(x, op.ID)
	f := fieldsOf(op)
	putSlot(x, i, held, rev, op.ID, &f)
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
	}
	s := opSlot{rev: rev, created: f.created, completed: f.completed, duration: f.duration,
		typ: addName(&x.names, f.typ), status: addName(&x.names, f.status), volume: addName(&x.names, f.volume),
		vm: addName(&x.names, f.vm), by: addName(&x.names, f.by)}
	if !held {
		i = x.alloc()
		var canon bool
		s.key, canon = parseOpKey(id)
		if s.named = !canon; s.named {
			// Its own copy: id may be part of a larger string (the
			// watcher's is the message's subject).
			x.named[i] = strings.Clone(id)
		}
		x.slots[i] = s
		x.byID.add(x, i)
	} else {
		s.key, s.named = x.slots[i].key, x.slots[i].named
	}
	x.slots[i] = s
	// A record without a status (written by hand) is no live operation,
	// as its slot says (unindexSlot, the cache): in no list.
	if !x.deferred && s.status != 0 {
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
	x.free = append(x.free, i) // reused by new operations
}

// unindex takes id's live slot, if any, out of the lists and counters
// and makes it a tombstone at the same revision.
func (x *opIndex) unindex(id string) {
	if i, ok := x.byID.get(x, id); ok {
		x.unindexSlot(i)
	}
}

// unindexSlot is unindex of slot i.
func (x *opIndex) unindexSlot(i uint32) {
	if x.slots[i].status == 0 {
		return
	}
	if !x.deferred {
		x.index(i, -1)
	}
	s := &x.slots[i]
	for _, h := range [...]uint32{s.typ, s.status, s.volume, s.vm, s.by} {
		x.names.drop(h)
	}
	*s = opSlot{key: s.key, named: s.named, rev: s.rev}
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
	x.setLists(all)
}

// setLists makes the lists of the index, which has none, from all, its
// live slots oldest first: each list by appending, of the size it needs.
func (x *opIndex) setLists(all []uint32) {
	nstr := len(x.names.strs)
	var sizes [len(indexDims)][]int // dimension → string → operations
	for dim := range sizes {
		sizes[dim] = make([]int, nstr)
	}
	for _, i := range all {
		for dim, h := range x.slots[i].handles() {
			if *h != 0 {
				sizes[dim][*h]++
			}
		}
	}
	var lists [len(indexDims)][][]uint32
	for dim := range lists {
		lists[dim] = make([][]uint32, nstr)
		for h, size := range sizes[dim] {
			if size > 0 {
				lists[dim][h] = make([]uint32, 0, size)
			}
		}
	}
	for _, i := range all {
		for dim, h := range x.slots[i].handles() {
			if *h != 0 {
				lists[dim][*h] = append(lists[dim][*h], i)
			}
		}
	}
	if len(all) > 0 {
		x.lists["all"] = all
	}
	for dim, byValue := range lists {
		for h, l := range byValue {
			if len(l) > 0 {
				x.lists[indexDims[dim]+":"+x.names.strs[h]] = l
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
	if !sa.named && !sb.named {
		return bytes.Compare(sa.key[:], sb.key[:])
	}
	return strings.Compare(x.idOf(a), x.idOf(b))
}

// listNames names the lists slot i belongs to.
func (x *opIndex) listNames(i uint32) []string {
	s := &x.slots[i]
	return indexNames(x.names.str(s.typ), x.names.str(s.status), x.names.str(s.volume), x.names.str(s.vm),
		x.names.str(s.by), true)
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
	s := &x.slots[i]
	typ, status := commands.OpType(x.names.str(s.typ)), commands.OpStatus(x.names.str(s.status))
	x.stats.Total += sign
	x.stats.ByType[typ] += sign
	x.stats.ByStatus[status] += sign
	if status.Terminal() {
		x.stats.Terminal += sign
		x.stats.TerminalDuration += time.Duration(sign) * s.duration
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
		s string
	}{{&m.typ, string(f.Type)}, {&m.status, string(f.Status)}, {&m.volume, f.VolumeID}, {&m.vm, f.VMID}, {&m.by, f.RequestedBy}} {
		if v.s == "" {
			continue
		}
		h, ok := x.names.lookup(v.s)
		*v.h, m.ok = h, m.ok && ok
	}
	return m
}

func (m opMatch) matches(s *opSlot) bool {
	return s.status != 0 && (m.typ == 0 || s.typ == m.typ) && (m.status == 0 || s.status == m.status) &&
		(m.volume == 0 || s.volume == m.volume) && (m.vm == 0 || s.vm == m.vm) && (m.by == 0 || s.by == m.by)
}

// list returns the ids and revisions of up to limit operations matching
// f (0: no limit) newest first, strictly after the cursor after (nil:
// from the newest), walking the smallest list f selects; more reports
// whether another one follows.
func (x *opIndex) list(f Filter, after *opRef, limit int) (ids []string, revs []uint64, more bool) {
	m := x.match(f)
	if !m.ok {
		return nil, nil, false
	}
	var walk []uint32
	for i, name := range filterIndexes(f) {
		if l := x.lists[name]; i == 0 || len(l) < len(walk) {
			walk = l
		}
	}
	start := len(walk)
	if after != nil {
		k, ok := parseOpKey(after.id)
		start, _ = slices.BinarySearchFunc(walk, *after, func(i uint32, r opRef) int {
			if c := cmp.Compare(x.slots[i].created, r.score); c != 0 {
				return c
			}
			return x.compareID(i, r.id, k, ok)
		})
	}
	for j := start - 1; j >= 0; j-- {
		s := &x.slots[walk[j]]
		if !m.matches(s) {
			continue
		}
		if limit > 0 && len(ids) == limit {
			return ids, revs, true
		}
		ids, revs = append(ids, x.idOf(walk[j])), append(revs, s.rev)
	}
	return ids, revs, false
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
			if s.completed >= before {
				continue
			}
			id, may := x.idOf(i), MayHold(commands.OpType(x.names.str(s.typ)))
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
