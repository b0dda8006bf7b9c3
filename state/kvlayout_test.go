package state_test

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

// TestKVIndexesOldRecords: the embedded store keeps its indexes in
// memory, made from the records at start, so records an older release
// wrote (raw entries of the 10bb206 layout, some with a requester) are
// listed by every filter, requester included, and counted, with no
// migration of the bucket.
func TestKVIndexesOldRecords(t *testing.T) {
	bus := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bucket := nextBucket()
	old, err := bus.JetStream().CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket, History: 1, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	const alice = "api-token:alice@127.0.0.1"
	var want []string
	for n := 1; n <= 20; n++ {
		op := storetest.Op(n, commands.OpDetach, commands.StatusCompleted, "vol-1", "vm-1", time.Date(2026, 3, 1, 0, 0, n, 0, time.UTC))
		if n%4 == 0 {
			op.RequestedBy = alice
			want = append([]string{op.ID}, want...)
		}
		data, _ := json.Marshal(op)
		if _, err := old.Put(ctx, "op."+op.ID, data); err != nil {
			t.Fatal(err)
		}
	}
	s := newKV(t, bus.JetStream(), bucket)
	got, _, err := s.ListOperations(ctx, state.Filter{RequestedBy: alice, VolumeID: "vol-1"})
	if err != nil || !slices.Equal(storetest.IDs(got), want) {
		t.Fatalf("by requester: %v, %v; want %v", storetest.IDs(got), err, want)
	}
	st, err := s.Stats(ctx)
	if err != nil || st.Total != 20 || st.ByType[commands.OpDetach] != 20 || st.Terminal != 20 {
		t.Fatalf("stats %+v, %v", st, err)
	}
}
