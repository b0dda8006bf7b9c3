package state

import "hash/maphash"

// idTable finds the slot of an operation id: open addressing with linear
// probing over a power-of-two table of slot numbers (plus one; 0 is
// empty), keys compared on the slots' ids, at most half full. Four to
// eight bytes per operation where a map[string]uint32 takes about 40, and
// its inserts stay within a table a few MB large.
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

func (t *idTable) home(id string) int {
	return int(maphash.String(t.seed, id) & uint64(len(t.cells)-1))
}

// find returns the cell holding id, or the empty cell where it would go.
func (t *idTable) find(slots []opSlot, id string) (int, bool) {
	mask := len(t.cells) - 1
	for c := t.home(id); ; c = (c + 1) & mask {
		v := t.cells[c]
		if v == 0 {
			return c, false
		}
		if slots[v-1].id == id {
			return c, true
		}
	}
}

// get returns the slot of id.
func (t *idTable) get(slots []opSlot, id string) (uint32, bool) {
	c, ok := t.find(slots, id)
	return t.cells[c] - 1, ok
}

// add records that id, not held yet, is in slot i; slots[i].id is id.
func (t *idTable) add(slots []opSlot, id string, i uint32) {
	if 2*(t.n+1) > len(t.cells) {
		t.resize(slots, 2*len(t.cells))
	}
	c, _ := t.find(slots, id)
	t.cells[c] = i + 1
	t.n++
}

// del forgets id, if held; the slots' ids must still be those added.
// Later cells of its run move back, so that no probe stops short of them.
func (t *idTable) del(slots []opSlot, id string) {
	c, ok := t.find(slots, id)
	if !ok {
		return
	}
	mask := len(t.cells) - 1
	for j := (c + 1) & mask; t.cells[j] != 0; j = (j + 1) & mask {
		h := t.home(slots[t.cells[j]-1].id)
		// The cell at j may move to c unless its home lies cyclically
		// in (c, j].
		if (j > c && (h <= c || h > j)) || (j < c && h <= c && h > j) {
			t.cells[c], c = t.cells[j], j
		}
	}
	t.cells[c] = 0
	t.n--
	if len(t.cells) > idTableMin && 8*t.n < len(t.cells) {
		t.resize(slots, len(t.cells)/2) // give back what pruning freed
	}
}

func (t *idTable) resize(slots []opSlot, size int) {
	old := t.cells
	t.cells = make([]uint32, size)
	mask := size - 1
	for _, v := range old {
		if v == 0 {
			continue
		}
		c := t.home(slots[v-1].id)
		for t.cells[c] != 0 {
			c = (c + 1) & mask
		}
		t.cells[c] = v
	}
}
