package lease_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/lease"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
	"github.com/volumed/volumed/stores/redisstore"
	"github.com/volumed/volumed/stores/storetest"
)

// TestRetention: a pass deletes what completed before the keep time, in
// batches, and nothing else; it leaves the work to the instance holding
// the lease; two running instances converge on the same result.
func TestRetention(t *testing.T) {
	r := testenv.StartRedis(t)
	bus := testenv.StartBus(t)
	for name, open := range map[string]func(t *testing.T) state.Store{
		"kv": func(t *testing.T) state.Store {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			s, err := state.NewKV(ctx, bus.JetStream(), state.KVConfig{Bucket: "retention"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.Close(context.Background()) })
			return s
		},
		"redis": func(t *testing.T) state.Store {
			s, err := redisstore.New(context.Background(), redisstore.Config{URL: r.URL()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.Close(context.Background()) })
			return s
		},
	} {
		t.Run(name, func(t *testing.T) {
			s := open(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			now := time.Now().UTC()
			old, recent := now.Add(-2*time.Hour), now.Add(-time.Minute)
			var keep []string
			for i := range 7 {
				op := storetest.Op(i+1, commands.OpAttach, commands.StatusCompleted, "vol-1", "", old.Add(-time.Hour))
				switch i {
				case 0:
					op.CompletedAt = &recent
					keep = append(keep, op.ID)
				case 1:
					op.Status = commands.StatusExecuting
					keep = append(keep, op.ID)
				default:
					op.CompletedAt = &old
				}
				if _, err := s.CreateOperation(ctx, op); err != nil {
					t.Fatal(err)
				}
			}
			a, err := lease.NewRetention(lease.RetentionConfig{Store: s, Keep: time.Hour, Batch: 2, Holder: "a"})
			if err != nil {
				t.Fatal(err)
			}
			other, err := s.AcquireLease(ctx, lease.RetentionLease, "x", time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			if n, err := a.Prune(ctx); n != 0 || err != nil {
				t.Fatalf("pass while another holds the lease: %d, %v", n, err)
			}
			if got := storetest.ListIDs(t, s, state.Filter{}); len(got) != 7 {
				t.Fatalf("deleted without the lease: %v", got)
			}
			if err := s.ReleaseLease(ctx, other); err != nil {
				t.Fatal(err)
			}
			if n, err := a.Prune(ctx); n != 5 || err != nil {
				t.Fatalf("first pass, 2 per batch: %d, %v; want 5", n, err)
			}
			if got := storetest.ListIDs(t, s, state.Filter{}); len(got) != 2 {
				t.Fatalf("after the first pass: %v", got)
			}
			l, err := s.AcquireLease(ctx, lease.RetentionLease, "x", time.Minute)
			if err != nil {
				t.Fatalf("the pass kept the lease: %v", err)
			}
			if err := s.ReleaseLease(ctx, l); err != nil {
				t.Fatal(err)
			}

			for i := range 3 {
				op := storetest.Op(20+i, commands.OpDelete, commands.StatusFailed, "vol-2", "", old.Add(-time.Hour))
				op.CompletedAt = &old
				if _, err := s.CreateOperation(ctx, op); err != nil {
					t.Fatal(err)
				}
			}
			b, err := lease.NewRetention(lease.RetentionConfig{Store: s, Keep: time.Hour, Batch: 2, Holder: "b"})
			if err != nil {
				t.Fatal(err)
			}
			for _, x := range []*lease.Retention{a, b} {
				if err := x.Start(ctx); err != nil {
					t.Fatal(err)
				}
			}
			testenv.Eventually(t, 10*time.Second, func() bool {
				got := storetest.ListIDs(t, s, state.Filter{})
				slices.Sort(got)
				return slices.Equal(got, keep)
			}, "two instances prune to the kept operations")
			for range 2 {
				for _, x := range []*lease.Retention{a, b} {
					if err := x.Close(ctx); err != nil {
						t.Fatal(err)
					}
				}
			}
		})
	}
	if _, err := lease.NewRetention(lease.RetentionConfig{Keep: time.Hour}); err == nil {
		t.Fatal("retention without a store")
	}
}

// localCopies is a store keeping copies of its own, recording the cuts
// it was asked to prune them at.
type localCopies struct {
	*memstore.Store
	cuts []time.Time
}

func (s *localCopies) PruneLocal(before time.Time) { s.cuts = append(s.cuts, before) }

// TestRetentionPrunesLocalCopies: each instance prunes its own copies of
// records (the embedded store's archive) on every pass, whether it holds
// the lease or another instance does.
func TestRetentionPrunesLocalCopies(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := &localCopies{Store: memstore.New()}
	r, err := lease.NewRetention(lease.RetentionConfig{Store: s, Keep: time.Hour, Holder: "a"})
	if err != nil {
		t.Fatal(err)
	}
	other, err := s.AcquireLease(ctx, lease.RetentionLease, "x", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := r.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	if len(s.cuts) != 1 || s.cuts[0].Before(start.Add(-time.Hour)) || s.cuts[0].After(time.Now().Add(-time.Hour)) {
		t.Fatalf("pass while another instance holds the lease: local copies pruned at %v, want once, an hour back", s.cuts)
	}
	if err := s.ReleaseLease(ctx, other); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	if len(s.cuts) != 2 {
		t.Fatalf("pass with the lease: local copies pruned %d times, want 2", len(s.cuts))
	}
}
