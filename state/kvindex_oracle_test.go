package state

import "github.com/volumed/volumed/commands"

// The whole index in the heap, as it was before the base on disk: what
// the tests compare opLayers with. The store uses opLayers.

// len counts the live operations.
func (x *opIndex) len() int { return int(x.stats.Total) }

// put records op at revision rev, replacing what id held.
func (x *opIndex) put(rev uint64, op *commands.Operation) {
	i, held := x.byID.get(x, op.ID)
	f := fieldsOf(op)
	putSlot(x, i, held, rev, op.ID, &f)
}

// list is hits, as ids and revisions.
func (x *opIndex) list(f Filter, after *opRef, limit int) (ids []string, revs []uint64, more bool) {
	return idsOf(x.hits(f, after, limit))
}

// list is hits, as ids and revisions.
func (x *opLayers) list(f Filter, after *opRef, limit int) (ids []string, revs []uint64, more bool) {
	return idsOf(x.hits(f, after, limit))
}

// idsOf is the ids and revisions of hits.
func idsOf(hits []opHit, more bool) (ids []string, revs []uint64, _ bool) {
	for _, h := range hits {
		ids, revs = append(ids, h.id), append(revs, h.rev)
	}
	return ids, revs, more
}
