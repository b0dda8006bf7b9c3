package state

import (
	"bytes"
	"encoding/hex"
	"hash/maphash"
	"strings"
)

// opKey is an operation id as the index's slots hold it: the 16 bytes of
// the UUID of an id of the form volumed makes, "op-" and a lowercase UUID
// (no pointer, no allocation); an id of any other form is held whole in
// opIndex.named, and its key is zero.
type opKey [16]byte

// opIDPrefix begins the ids volumed makes.
const opIDPrefix = "op-"

// parseOpKey returns the key of id when it has volumed's form, "op-" and
// a UUID in lowercase hex with its four dashes; ok false otherwise.
func parseOpKey[S ~string | ~[]byte](id S) (k opKey, ok bool) {
	const n = len(opIDPrefix) + 36
	if len(id) != n || string(id[:len(opIDPrefix)]) != opIDPrefix {
		return k, false
	}
	j := 0
	for i := len(opIDPrefix); i < n; {
		switch i - len(opIDPrefix) {
		case 8, 13, 18, 23:
			if id[i] != '-' {
				return k, false
			}
			i++
			continue
		}
		hi, ok1 := lowerHex(id[i])
		lo, ok2 := lowerHex(id[i+1])
		if !ok1 || !ok2 {
			return k, false
		}
		k[j] = hi<<4 | lo
		i, j = i+2, j+1
	}
	return k, true
}

func lowerHex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

// appendOpID appends the id of key k: "op-" and its UUID.
func appendOpID(dst []byte, k *opKey) []byte {
	dst = append(dst, opIDPrefix...)
	for i, b := range k {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			dst = append(dst, '-')
		}
		dst = hex.AppendEncode(dst, []byte{b})
	}
	return dst
}

// idOf is the id of slot i.
func (x *opIndex) idOf(i uint32) string {
	if x.slots[i].named() {
		return x.named[i]
	}
	return string(appendOpID(make([]byte, 0, len(opIDPrefix)+36), &x.slots[i].key))
}

// compareID orders slot i's id against id, whose key is k when ok, as
// strings.Compare does: on the keys when both are of volumed's form (its
// lowercase hex sorts as the bytes do).
func (x *opIndex) compareID(i uint32, id string, k opKey, ok bool) int {
	if s := &x.slots[i]; !s.named() && ok {
		return bytes.Compare(s.key[:], k[:])
	}
	return strings.Compare(x.idOf(i), id)
}

// idTable finds the slot of an operation id: open addressing with linear
// probing over a power-of-two table of slot numbers (plus one; 0 is
// empty), keys compared on the slots, at most half full. Eight to 16
// bytes per operation where a map[string]uint32 takes about 40, and its
// inserts stay within a table a few MB large.
type idTable struct {
	cells []uint32
	n     int
	seed  maphash.Seed
}

// idTableMin is the smallest table.
const idTableMin = 64

func newIDTable(n int) idTable {
	size := idTableMin
	for size < 2*n {
		size *= 2
	}
	return idTable{cells: make([]uint32, size), seed: maphash.MakeSeed()}
}

func (t *idTable) len() int { return t.n }

// home is the first cell of the id whose key is k when ok.
func (t *idTable) home(id string, k *opKey, ok bool) int {
	var h uint64
	if ok {
		h = maphash.Bytes(t.seed, k[:])
	} else {
		h = maphash.String(t.seed, id)
	}
	return int(h & uint64(len(t.cells)-1))
}

// homeOf is the first cell of slot i's id.
func (t *idTable) homeOf(x *opIndex, i uint32) int {
	if s := &x.slots[i]; !s.named() {
		return t.home("", &s.key, true)
	}
	return t.home(x.named[i], nil, false)
}

// find returns the cell holding id, or the empty cell where it would go.
func (t *idTable) find(x *opIndex, id string) (int, bool) {
	k, ok := parseOpKey(id)
	return t.findKey(x, id, &k, ok)
}

// findKey is find of the id whose key is k when ok (id is not read then).
func (t *idTable) findKey(x *opIndex, id string, k *opKey, ok bool) (int, bool) {
	mask := len(t.cells) - 1
	for c := t.home(id, k, ok); ; c = (c + 1) & mask {
		v := t.cells[c]
		if v == 0 {
			return c, false
		}
		if s := &x.slots[v-1]; (ok && !s.named() && s.key == *k) || (!ok && s.named() && x.named[v-1] == id) {
			return c, true
		}
	}
}

// get returns the slot of id.
func (t *idTable) get(x *opIndex, id string) (uint32, bool) {
	c, ok := t.find(x, id)
	return t.cells[c] - 1, ok
}

// add records slot i, whose id is not held yet.
func (t *idTable) add(x *opIndex, i uint32) {
	if 2*(t.n+1) > len(t.cells) {
		t.resize(x, 2*len(t.cells))
	}
	mask := len(t.cells) - 1
	c := t.homeOf(x, i)
	for t.cells[c] != 0 {
		c = (c + 1) & mask
	}
	t.cells[c] = i + 1
	t.n++
}

// del forgets id, if held; the slots must still hold the ids added.
// Later cells of its run move back, so that no probe stops short of them.
func (t *idTable) del(x *opIndex, id string) {
	c, ok := t.find(x, id)
	if !ok {
		return
	}
	mask := len(t.cells) - 1
	for j := (c + 1) & mask; t.cells[j] != 0; j = (j + 1) & mask {
		h := t.homeOf(x, t.cells[j]-1)
		// The cell at j may move to c unless its home lies cyclically
		// in (c, j].
		if (j > c && (h <= c || h > j)) || (j < c && h <= c && h > j) {
			t.cells[c], c = t.cells[j], j
		}
	}
	t.cells[c] = 0
	t.n--
	if len(t.cells) > idTableMin && 8*t.n < len(t.cells) {
		t.resize(x, len(t.cells)/2) // give back what pruning freed
	}
}

func (t *idTable) resize(x *opIndex, size int) {
	old := t.cells
	t.cells = make([]uint32, size)
	mask := size - 1
	for _, v := range old {
		if v == 0 {
			continue
		}
		c := t.homeOf(x, v-1)
		for t.cells[c] != 0 {
			c = (c + 1) & mask
		}
		t.cells[c] = v
	}
}
