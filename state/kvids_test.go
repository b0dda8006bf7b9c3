package state

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestIDTable: random adds and deletes, through growing and shrinking,
// find every id held and none other, as a map does.
func TestIDTable(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var slots []opSlot
	var free []uint32
	want := map[string]uint32{}
	tab := newIDTable(0)
	check := func(step int) {
		if tab.len() != len(want) {
			t.Fatalf("step %d: %d held, want %d", step, tab.len(), len(want))
		}
		for id, i := range want {
			if got, ok := tab.get(slots, id); !ok || got != i {
				t.Fatalf("step %d: %s in %d, %v; want %d", step, id, got, ok, i)
			}
		}
		if _, ok := tab.get(slots, "op-none"); ok {
			t.Fatalf("step %d: an id never added is found", step)
		}
	}
	for step := range 60000 {
		// Grow to a few thousand, then empty most of it, then grow again;
		// then stay near half of the smallest table, where runs wrap
		// around its end.
		add := rng.IntN(10) < 7
		switch {
		case step >= 8000 && step < 14000:
			add = rng.IntN(10) < 2
		case step >= 20000 && step < 30000:
			add = false
		case step >= 30000:
			add = len(want) < idTableMin/2-1
		}
		if add || len(want) == 0 {
			id := fmt.Sprintf("op-%d", rng.IntN(1<<20))
			if _, ok := want[id]; ok {
				continue
			}
			var i uint32
			if n := len(free); n > 0 {
				i, free = free[n-1], free[:n-1]
			} else {
				slots, i = append(slots, opSlot{}), uint32(len(slots))
			}
			slots[i] = opSlot{id: id}
			tab.add(slots, id, i)
			want[id] = i
		} else {
			for id, i := range want { // a random one: map order
				tab.del(slots, id)
				delete(want, id)
				slots[i], free = opSlot{}, append(free, i)
				break
			}
		}
		if step%500 == 0 || step >= 30000 {
			check(step)
		}
	}
	if len(tab.cells) > 4*max(idTableMin, 2*tab.len()) {
		t.Fatalf("%d cells for %d ids", len(tab.cells), tab.len())
	}
}
