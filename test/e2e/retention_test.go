package e2e_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestOperationRetention runs the daemon with --op-retention 2s on both
// stores: a completed operation disappears from reads and lists after it,
// an operation still running does not.
func TestOperationRetention(t *testing.T) {
	forEachStore(t, func(t *testing.T, o daemonOpts) {
		sim := startSim(t, cloudsim.Config{})
		o.extra = []string{"--op-retention", "2s"}
		d := startDaemon(t, sim, o)
		vol := d.createVolume("short-lived", 1)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c := d.cli()
		page, err := c.ListOperations(ctx, client.ListOptions{VolumeID: vol})
		if err != nil || len(page.Operations) != 1 {
			t.Fatalf("operations of the new volume: %+v %v", page, err)
		}
		done := page.Operations[0].ID

		// An attach whose job hangs stays executing, old as it gets.
		if err := sim.SetFaults(cloudsim.Faults{JobHangRate: map[string]float64{"attachVolume": 1}}); err != nil {
			t.Fatal(err)
		}
		running := d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID})
		testenv.Eventually(t, 30*time.Second, func() bool {
			_, err := c.GetOperation(ctx, done)
			return client.HasCode(err, commands.CodeNotFound)
		}, "completed create %s pruned after 2s", done)
		page, err = c.ListOperations(ctx, client.ListOptions{VolumeID: vol})
		if err != nil || len(page.Operations) != 1 || page.Operations[0].ID != running.ID {
			t.Fatalf("operations after the prune: %+v %v, want only the running attach", page, err)
		}
		op, err := c.GetOperation(ctx, running.ID)
		if err != nil || op.Status.Terminal() {
			t.Fatalf("running attach: %+v %v", op, err)
		}
	})
}
