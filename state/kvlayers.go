package state

import (
	"bytes"
	"cmp"
	"iter"
	"maps"
	"math/bits"
	"slices"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
)

// opLayers is the embedded store's operation index: an immutable base on
// disk (opBase, nil until the first cache file is written or when there
// is none) and, in the heap, what changed since (delta, an opIndex of the
// operations created, changed or deleted since, and dead, the base slots
// they replace). Every answer merges the two. The store writes a new base
// from both when the delta grows past deltaMin (compaction,
// KV.saveCache), and the delta with each cache file; it is not safe for concurrent use: KV.mu
// guards it, and a base is closed only under its write lock, so no
// reader outlives its base.
type opLayers struct {
	base  *opBase
	dead  []uint64 // bitmap of the base's slots replaced or deleted
	ndead int      // the slots dead
	delta *opIndex
	// baseStats are the counters of the base's live slots.
	baseStats Stats
	// journal, when not nil, records every change while a new base is
	// written, to be made again on it (swap).
	journal *[]opChange
}

// opChange is one change of the index: a put of f at rev, a tombstone
// at rev (tomb), a removal (remove), or a tombstone a new base left out
// (bare).
type opChange struct {
	id                 string
	rev                uint64
	f                  opFields[string]
	tomb, remove, bare bool
}

// deltaMin is the fewest operations the delta holds before a new base is
// written: a new base is written past the larger of it and an eighth of
// the base. A variable for the tests.
var deltaMin = 1 << 16

func newOpLayers() *opLayers { return &opLayers{delta: newOpIndex(), baseStats: newStats()} }

// layersOn is an index of base b but its slots dead (a bitmap, which
// openBase left out of b's counters; nil: none) and an empty delta.
func layersOn(b *opBase, dead []uint64) *opLayers {
	x := newOpLayers()
	x.base, x.dead = b, make([]uint64, (b.n+63)/64)
	copy(x.dead, dead)
	for _, w := range dead {
		x.ndead += bits.OnesCount64(w)
	}
	x.baseStats = b.stats.clone()
	return x
}

// rebase reports whether the next cache write should write a new base:
// the delta is full, or the base is in a cache file of version 3, which
// the next cache file replaces.
func (x *opLayers) rebase() bool { return x.full() || (x.base != nil && x.base.ref.name == "") }

// pending is the number of operations (and tombstones) in the delta.
func (x *opLayers) pending() int { return len(x.delta.slots) - len(x.delta.free) }

// full reports whether the delta should be merged into a new base: it
// and the dead slots (which every walk of the base still reads, as the
// prune's after deletions) are past the larger of deltaMin and an eighth
// of the base.
func (x *opLayers) full() bool {
	n := 0
	if x.base != nil {
		n = x.base.n
	}
	return x.pending()+x.ndead > max(deltaMin, n/8)
}

// small reports whether the delta is small enough to copy for a new
// base written without the lock (snapshot).
func (x *opLayers) small() bool { return len(x.delta.slots) <= 4*deltaMin }

// snapshot returns a copy of x that later changes to x leave as it is:
// the base (immutable) shared, the dead slots and the delta copied.
func (x *opLayers) snapshot() *opLayers {
	return &opLayers{base: x.base, dead: slices.Clone(x.dead), delta: x.delta.clone(), baseStats: x.baseStats.clone()}
}

// clone returns a copy of x.
func (x *opIndex) clone() *opIndex {
	y := *x
	y.slots, y.free = slices.Clone(x.slots), slices.Clone(x.free)
	y.byID.cells = slices.Clone(x.byID.cells)
	y.named, y.wide = maps.Clone(x.named), maps.Clone(x.wide)
	y.kinds, y.names = x.kinds.clone(), x.names.clone()
	y.lists = make(map[string][]uint32, len(x.lists))
	for name, l := range x.lists {
		y.lists[name] = slices.Clone(l)
	}
	y.stats = x.stats.clone()
	return &y
}

func (n *interner) clone() interner {
	return interner{ids: maps.Clone(n.ids), strs: slices.Clone(n.strs), users: slices.Clone(n.users), free: slices.Clone(n.free)}
}

func (x *opLayers) isDead(i uint32) bool { return isDeadIn(x.dead, i) }

// baseLive returns id's live base slot.
func (x *opLayers) baseLive(id string) (uint32, bool) {
	i, ok := x.base.find(id)
	if !ok || x.isDead(i) {
		return 0, false
	}
	return i, true
}

// kill marks base slot i dead and takes it out of the counters.
func (x *opLayers) kill(i uint32) {
	x.dead[i/64] |= 1 << (i % 64)
	x.ndead++
	var r baseRec
	x.base.rec(i, &r)
	x.base.uncount(&x.baseStats, &r)
}

// rev returns the revision the index holds for id (0: none), and its
// status when it is live.
func (x *opLayers) rev(id string) (uint64, commands.OpStatus, bool) {
	if rev, st, live := x.delta.rev(id); rev != 0 {
		return rev, st, live
	}
	i, ok := x.baseLive(id)
	if !ok {
		return 0, "", false
	}
	var r baseRec
	x.base.rec(i, &r)
	return r.rev, commands.OpStatus(x.base.str(r.h[1])), true
}

// len counts the live operations.
func (x *opLayers) len() int { return int(x.baseStats.Total + x.delta.stats.Total) }

// stats returns the counters, a copy.
func (x *opLayers) stats() Stats {
	s, d := x.baseStats.clone(), x.delta.stats
	s.Total += d.Total
	s.Terminal += d.Terminal
	s.TerminalDuration += d.TerminalDuration
	for t, n := range d.ByType {
		s.ByType[t] += n
	}
	for st, n := range d.ByStatus {
		s.ByStatus[st] += n
	}
	return s
}

func (x *opLayers) record(c opChange) {
	if x.journal != nil {
		*x.journal = append(*x.journal, c)
	}
}

// put records op at revision rev, replacing what id held.
func (x *opLayers) put(rev uint64, op *commands.Operation) {
	f := fieldsOf(op)
	x.putFields(op.ID, rev, &f)
}

func (x *opLayers) putFields(id string, rev uint64, f *opFields[string]) {
	x.record(opChange{id: id, rev: rev, f: *f})
	if r, _, _ := x.delta.rev(id); r == 0 {
		if i, ok := x.baseLive(id); ok {
			x.kill(i)
		}
	}
	i, held := x.delta.byID.get(x.delta, id)
	putSlot(x.delta, i, held, rev, id, f)
}

// putNewerLayers records f as operation id's at revision rev unless the
// index holds that revision of it or a later one, and reports whether it
// did.
func putNewerLayers[S ~string | ~[]byte](x *opLayers, id string, rev uint64, f *opFields[S]) bool {
	if x.base == nil && x.journal == nil {
		return putNewer(x.delta, id, rev, f)
	}
	if held, _, _ := x.rev(id); held >= rev {
		return false
	}
	sf := opFields[string]{typ: string(f.typ), status: string(f.status), volume: string(f.volume), vm: string(f.vm),
		by: string(f.by), created: f.created, completed: f.completed, duration: f.duration}
	x.putFields(id, rev, &sf)
	return true
}

// tombstone unindexes id but keeps its revision rev, so that a stale put
// of that revision or an older one is recognised as such.
func (x *opLayers) tombstone(id string, rev uint64) {
	x.record(opChange{id: id, rev: rev, tomb: true})
	if r, _, _ := x.delta.rev(id); r != 0 {
		x.delta.tombstone(id, rev)
		return
	}
	if i, ok := x.baseLive(id); ok {
		x.kill(i)
		// A slot without a status: no live operation.
		putSlot(x.delta, 0, false, rev, id, &opFields[string]{})
	}
}

// remove forgets id.
func (x *opLayers) remove(id string) {
	x.record(opChange{id: id, remove: true})
	x.delta.remove(id)
	if i, ok := x.baseLive(id); ok {
		x.kill(i)
	}
}

// apply makes change c.
func (x *opLayers) apply(c *opChange) {
	switch {
	case c.remove:
		x.remove(c.id)
	case c.bare:
		putSlot(x.delta, 0, false, c.rev, c.id, &opFields[string]{})
	case c.tomb:
		x.tombstone(c.id, c.rev)
	default:
		x.putFields(c.id, c.rev, &c.f)
	}
}

// opHit is an operation a listing found.
type opHit struct {
	id    string
	rev   uint64
	score int64
}

func compareHits(a, b opHit) int { return compareRefs(opRef{a.score, a.id}, opRef{b.score, b.id}) }

// hits returns up to limit operations matching f (0: no limit) newest
// first, strictly after the cursor after (nil: from the newest); more
// reports whether another one follows. It merges the delta's and the
// base's.
func (x *opLayers) hits(f Filter, after *opRef, limit int) (hits []opHit, more bool) {
	hits, more = x.delta.hits(f, after, limit)
	if x.base != nil {
		bh, bmore := x.baseHits(f, after, limit)
		if len(bh) > 0 {
			hits = append(hits, bh...)
			slices.SortFunc(hits, func(a, b opHit) int { return compareHits(b, a) })
		}
		more = more || bmore
		if limit > 0 && len(hits) > limit {
			hits, more = hits[:limit], true
		}
	}
	return hits, more
}

// baseHits is hits of the base's live slots.
func (x *opLayers) baseHits(f Filter, after *opRef, limit int) (hits []opHit, more bool) {
	b := x.base
	var want [len(indexDims)]uint32
	var walk baseList
	all := true
	for dim, s := range [...]string{string(f.Type), string(f.Status), f.VolumeID, f.VMID, f.RequestedBy} {
		if s == "" {
			continue
		}
		l, ok := b.list(dim, s)
		if !ok {
			return nil, false
		}
		want[dim], _ = b.handle(dim, s)
		if all || l.n < walk.n {
			walk, all = l, false
		}
	}
	end := b.n
	if after != nil {
		end = int(b.before(*after))
	}
	var r baseRec
	visit := func(e baseEntry) bool {
		if x.isDead(e.slot) {
			return true
		}
		for dim, h := range want {
			if h != 0 && e.h[dim] != h {
				return true
			}
		}
		if limit > 0 && len(hits) == limit {
			more = true
			return false
		}
		b.rec(e.slot, &r)
		hits = append(hits, opHit{id: b.idOf(e.slot, &r.key), rev: r.rev, score: r.created})
		return true
	}
	if all {
		b.slotsDown(end, visit)
	} else {
		b.down(walk, b.listBefore(walk, uint32(end)), visit)
	}
	return hits, more
}

// expired returns the ids and revisions of up to limit (0: no limit)
// terminal operations completed before the score before, oldest created
// first within each terminal status, but the held ones, and which of
// them the retention may hold (MayHold), as opIndex.expired.
func (x *opLayers) expired(before int64, limit int, held map[string]struct{}) (ids []string, revs []uint64, mayHold []bool) {
	if x.base == nil {
		return x.delta.expired(before, limit, held)
	}
	type cand struct {
		id        string
		rev       uint64
		created   int64
		completed int64
		typ       string
	}
	compare := func(a, b *cand) int { return compareRefs(opRef{a.created, a.id}, opRef{b.created, b.id}) }
	d := x.delta
	for _, st := range commands.OpStatuses {
		if !st.Terminal() {
			continue
		}
		// The delta's, oldest first: few.
		var dc []cand
		for _, i := range d.lists["status:"+string(st)] {
			s := &d.slots[i]
			if s.created >= before {
				break
			}
			completed, _ := d.times(i)
			typ, _ := d.kindsOf(i)
			dc = append(dc, cand{d.idOf(i), s.rev, s.created, completed, d.kinds.str(typ)})
		}
		// take is the loop of opIndex.expired on one candidate: false
		// to stop.
		take := func(c *cand) bool {
			if c.created >= before || (limit > 0 && len(ids) >= limit) {
				return false
			}
			if c.completed >= before {
				return true
			}
			may := MayHold(commands.OpType(c.typ))
			if _, ok := held[c.id]; ok && may {
				return true
			}
			ids, revs, mayHold = append(ids, c.id), append(revs, c.rev), append(mayHold, may)
			return true
		}
		j := 0
		stopped := false
		if l, ok := x.base.list(1, string(st)); ok {
			var r baseRec
			x.base.up(l, func(e baseEntry) bool {
				if x.isDead(e.slot) {
					return true
				}
				x.base.rec(e.slot, &r)
				c := cand{x.base.idOf(e.slot, &r.key), r.rev, r.created, r.completed, x.base.str(r.h[0])}
				for j < len(dc) && compare(&dc[j], &c) < 0 {
					if !take(&dc[j]) {
						stopped = true
						return false
					}
					j++
				}
				if !take(&c) {
					stopped = true
					return false
				}
				return true
			})
		}
		for ; !stopped && j < len(dc); j++ {
			if !take(&dc[j]) {
				break
			}
		}
	}
	return ids, revs, mayHold
}

// opRec is one operation as a new base is written from.
type opRec struct {
	key                opKey
	name               string // the id when not of volumed's form
	rev                uint64
	created, completed int64
	duration           time.Duration
	vals               [len(indexDims)]string // type, status, volume, VM, requester
}

func (r *opRec) id() string {
	if r.name != "" {
		return r.name
	}
	return string(appendOpID(nil, &r.key))
}

// compareRecs orders a and b as the index does: by creation, then id.
func compareRecs(a, b *opRec) int {
	if c := cmp.Compare(a.created, b.created); c != 0 {
		return c
	}
	if a.name == "" && b.name == "" {
		return bytes.Compare(a.key[:], b.key[:])
	}
	return strings.Compare(a.id(), b.id())
}

// records yields the live operations at revisions up to maxRev oldest
// first, merging the base's and the delta's.
func (x *opLayers) records(maxRev uint64) iter.Seq[*opRec] {
	return func(yield func(*opRec) bool) {
		d := x.delta
		next, stop := iter.Pull(d.ascending)
		defer stop()
		var dr opRec
		dok := false
		advance := func() {
			for {
				i, ok := next()
				if !ok {
					dok = false
					return
				}
				if d.slots[i].rev <= maxRev {
					d.rec(i, &dr)
					dok = true
					return
				}
			}
		}
		advance()
		if x.base != nil {
			var br opRec
			stopped := false
			x.base.slotsUp(func(i uint32, r *baseRec) bool {
				// Every revision of a base is at most the sequence
				// of the cache it was written at: at most maxRev.
				if x.isDead(i) {
					return true
				}
				br = opRec{key: r.key, name: x.base.nameAt[i], rev: r.rev, created: r.created, completed: r.completed,
					duration: r.duration}
				for dim, h := range r.h {
					br.vals[dim] = x.base.str(h)
				}
				for dok && compareRecs(&dr, &br) < 0 {
					if !yield(&dr) {
						stopped = true
						return false
					}
					advance()
				}
				if !yield(&br) {
					stopped = true
					return false
				}
				return true
			})
			if stopped {
				return
			}
		}
		for dok {
			if !yield(&dr) {
				return
			}
			advance()
		}
	}
}

// rec fills r with slot i's values.
func (x *opIndex) rec(i uint32, r *opRec) {
	s := &x.slots[i]
	*r = opRec{rev: s.rev, created: s.created}
	if s.named() {
		r.name = x.named[i]
	} else {
		r.key = s.key
	}
	r.completed, r.duration = x.times(i)
	h := x.handles(i)
	for dim, v := range h {
		r.vals[dim] = x.interner(dim).str(v)
	}
}

// rest returns what a base written at maxRev leaves out of the delta: the
// operations at later revisions and the tombstones, as changes to make on
// it. A base holds no revision past the cache sequence it was written at,
// and those only grow, so the delta holds all of them.
func (x *opLayers) rest(maxRev uint64) []opChange {
	var out []opChange
	d := x.delta
	for i := range d.slots {
		s := &d.slots[i]
		switch {
		case s.rev == 0: // free
		case s.status == 0:
			out = append(out, opChange{id: d.idOf(uint32(i)), rev: s.rev, bare: true})
		case s.rev > maxRev:
			var r opRec
			d.rec(uint32(i), &r)
			out = append(out, opChange{id: r.id(), rev: r.rev, f: opFields[string]{typ: r.vals[0], status: r.vals[1],
				volume: r.vals[2], vm: r.vals[3], by: r.vals[4], created: r.created, completed: r.completed, duration: r.duration}})
		}
	}
	return out
}

// adopt makes x, a new base written from old at revisions up to a
// sequence (and an empty delta), hold what old holds: the rest of old's
// delta the base left out (opLayers.rest), then the changes made to old
// since (its journal). old's base is closed: its readers hold KV.mu, as
// does the caller, for writing.
func (x *opLayers) adopt(old *opLayers, rest, journal []opChange) {
	for i := range rest {
		x.apply(&rest[i])
	}
	for i := range journal {
		x.apply(&journal[i])
	}
	old.journal = nil
	old.base.close()
}
