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

func BenchmarkMemstore(b *testing.B) {
	storetest.Bench(b, func(testing.TB) state.Store { return memstore.New() })
}
