package state_test

import (
	"flag"
	"testing"
	"time"

	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

var indexOps = flag.Int("index-ops", 1_000_000, "operations of BenchmarkOpIndexHistory")

// BenchmarkOpIndexHistory measures the operation index alone on
// storetest.History (-index-ops operations over 10,000 volumes, 1,000
// VMs and 20 requesters, as make bench-scale): its live heap per
// operation as the first read makes it and as a restart loads it from
// its cache encoding, and the latency of bench/scale's listings on the
// loaded one (one and two filters, first page and a cursor in the second
// quarter from the oldest), in process, without the records' reads.
func BenchmarkOpIndexHistory(b *testing.B) {
	n := *indexOps
	h := storetest.History{Volumes: 10_000, VMs: 1_000, Callers: 20,
		Start: time.Now().Add(-29 * 24 * time.Hour).Truncate(time.Second), Step: 29 * 24 * time.Hour / time.Duration(n)}
	state.BenchOpIndex(b, n, h)
}
