package memstore_test

import (
	"testing"

	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
	"github.com/volumed/volumed/stores/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(testing.TB) state.Store { return memstore.New() })
}

// TestListing: a listing walked page by page returns every executing
// operation that stays so, once, while others complete; the store reads
// a page at once and keeps no corrupt record.
func TestListing(t *testing.T) {
	storetest.RunListing(t, func(testing.TB) state.Store { return memstore.New() }, nil, nil)
}

func BenchmarkMemstore(b *testing.B) {
	storetest.Bench(b, func(testing.TB) state.Store { return memstore.New() })
}
