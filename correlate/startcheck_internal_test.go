package correlate

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// TestStartCheckWithoutAgent: the reads of a VM's mappings are held only
// while a check can come: a VM whose agent does not answer is found so
// and its mappings stand as recorded; a VM without detected mappings at
// start is never held, not even under a context already ended.
func TestStartCheckWithoutAgent(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, c := newStoreAndCorrelator(ctx, t, b)
	silent, bare := uuid.NewString(), uuid.NewString()
	at := time.Now().UTC()
	for _, m := range []commands.Mapping{
		{VolumeID: uuid.NewString(), VMID: silent, DevicePath: "/dev/vdb", LinuxState: commands.LinuxDetected},
		{VolumeID: uuid.NewString(), VMID: bare, LinuxState: commands.LinuxMissing},
	} {
		m.ID, m.CloudStackState, m.Size, m.CreatedAt, m.UpdatedAt, m.LastSync = "mapping-"+m.VolumeID, commands.CloudStackAttached, 1<<30, at, at, at
		if _, err := store.PutMapping(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	ended, end := context.WithCancel(ctx)
	end()
	if waited, err := c.AwaitStartCheck(ended, bare); waited || err != nil {
		t.Fatalf("VM without detected mappings: waited %v, err %v; want neither", waited, err)
	}
	wait, stop := context.WithTimeout(ctx, 5*time.Second)
	defer stop()
	if _, err := c.AwaitStartCheck(wait, silent); err != nil {
		t.Fatalf("VM whose agent does not answer: %v; want its mappings as recorded", err)
	}
}
