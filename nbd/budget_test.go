package nbd

import (
	"testing"
	"time"
)

// TestBudget: a connection is held to its share and the total, except
// that one holding nothing always gets a buffer (its floor, outside the
// total); releases wake waiters, and close ends a wait.
func TestBudget(t *testing.T) {
	b := newBudget(4*mib, 3*mib)
	var a, c, d connBudget
	take := func(cb *connBudget, n int64) grant {
		t.Helper()
		g, ok := b.acquire(cb, n)
		if !ok {
			t.Fatal("acquire: closed")
		}
		return g
	}
	ga1, ga2, ga3 := take(&a, mib), take(&a, mib), take(&a, mib) // a's share full
	gc1 := take(&c, mib)                                         // total full
	if gd := take(&d, 2*mib); !gd.floor {
		t.Fatalf("d, holding nothing, got %+v; want its floor", gd)
	} else if b.used != 4*mib {
		t.Fatalf("used %d after a floor grant, want 4 MiB", b.used)
	}
	got := make(chan grant)
	go func() { g, _ := b.acquire(&c, mib); got <- g }() // c must wait: total full
	select {
	case g := <-got:
		t.Fatalf("acquire over the total did not wait: %+v", g)
	case <-time.After(50 * time.Millisecond):
	}
	b.release(&a, ga1)
	if g := <-got; g.floor || g.n != mib {
		t.Fatalf("woken grant %+v", g)
	}
	go func() { _, ok := b.acquire(&a, 2*mib); got <- grant{floor: ok} }() // a: 2 MiB held + 2 over its share
	select {
	case <-got:
		t.Fatal("acquire over the connection's share did not wait")
	case <-time.After(50 * time.Millisecond):
	}
	b.close(&a)
	if g := <-got; g.floor {
		t.Fatal("acquire after close succeeded")
	}
	for _, r := range []struct {
		cb *connBudget
		g  grant
	}{{&a, ga2}, {&a, ga3}, {&c, gc1}} {
		b.release(r.cb, r.g)
	}
	if b.used != mib || a.used != 0 {
		t.Fatalf("used %d, a.used %d after releases; want 1 MiB (c's woken grant) and 0", b.used, a.used)
	}
}
