package state

// The version 2 encoder, which the release before wrote with: the tests
// write version 2 files with it, to check that this release reads them.

// encode writes the live operations at revisions up to maxRev, oldest
// first, after one table of the interned strings (the layout of every
// release: the types and statuses were interned with the names): "",
// the kinds' not among the names, then the names' after "", so that the
// few types and statuses keep one-byte numbers.
func (x *opIndex) encode(e *cacheEncoder, maxRev uint64) {
	var only []string                           // kinds not among the names
	kindAt := make([]uint32, len(x.kinds.strs)) // kinds number → table number
	for h, s := range x.kinds.strs {
		if _, named := x.names.ids[s]; h != 0 && s != "" && !named {
			only = append(only, s)
			kindAt[h] = uint32(len(only))
		}
	}
	shift := uint32(len(only)) // names number → table number: + shift
	for h, s := range x.kinds.strs {
		if at, named := x.names.ids[s]; h != 0 && s != "" && named {
			kindAt[h] = at + shift
		}
	}
	nameAt := func(h uint32) uint32 {
		if h == 0 {
			return 0
		}
		return h + shift
	}
	e.uvarint(uint64(1 + len(only) + len(x.names.strs) - 1))
	e.str("")
	for _, s := range only {
		e.str(s)
	}
	for _, s := range x.names.strs[1:] {
		e.str(s)
	}
	n := 0
	for i := range x.ascending {
		if x.slots[i].rev <= maxRev {
			n++
		}
	}
	e.uvarint(uint64(n))
	var id []byte
	for i := range x.ascending {
		s := &x.slots[i]
		if s.rev > maxRev {
			continue
		}
		id = x.appendID(id[:0], i)
		e.bytes(id)
		e.uvarint(s.rev)
		e.varint(s.created)
		completed, duration := x.times(i)
		e.varint(completed)
		e.varint(int64(duration))
		h := x.handles(i)
		for _, v := range [...]uint32{kindAt[h[0]], kindAt[h[1]], nameAt(h[2]), nameAt(h[3]), nameAt(h[4])} {
			e.uvarint(uint64(v))
		}
	}
}

// appendID appends the id of slot i.
func (x *opIndex) appendID(dst []byte, i uint32) []byte {
	if x.slots[i].named() {
		return append(dst, x.named[i]...)
	}
	return appendOpID(dst, &x.slots[i].key)
}

// bytes writes b with its length, as str writes a string.
func (e *cacheEncoder) bytes(b []byte) {
	e.uvarint(uint64(len(b)))
	_, _ = e.w.Write(b)
}
