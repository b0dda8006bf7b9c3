package e2e_test

import (
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/test/cloudsim"
)

// BenchmarkInstances measures operations completed per second by 1, 2 and
// 3 volumed processes on a three-node JetStream cluster, on a mixed
// workload against the simulator with short jobs (20 ms): 16 clients each
// run volume lifecycles (create, attach, detach, delete), every command
// through another instance than the one before. It reports ops/s and
// fails on any operation that does not complete.
func BenchmarkInstances(b *testing.B) {
	const clients, lifecycles = 16, 3 // per client and iteration
	for _, n := range []int{1, 2, 3} {
		b.Run(fmt.Sprintf("instances=%d", n), func(b *testing.B) {
			inv := cloudsim.DefaultInventory()
			inv.MaxDataDisks = 2 * clients // every client may hold an attached volume
			sim := startSim(b, cloudsim.Config{JobDuration: 20 * time.Millisecond, Inventory: inv})
			c := startNATSCluster(b, 3)
			ds := startInstances(b, sim, c, n)
			attach := map[string]string{"vm_id": cloudsim.RemoteVMID}
			ops := 0
			b.ResetTimer()
			start := time.Now()
			for it := 0; it < b.N; it++ {
				var wg sync.WaitGroup
				for cl := range clients {
					wg.Go(func() {
						for l := range lifecycles {
							k := cl + l
							pick := func(i int) *daemon { return ds[(k+i)%len(ds)] }
							op := pick(0).submit(http.MethodPost, "/volumes", map[string]any{
								"name": fmt.Sprintf("bench-%d-%d-%d", it, cl, l), "size": 1 << 30,
								"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
							vol := pick(1).completed(op.ID).VolumeID
							pick(2).completed(pick(1).submit(http.MethodPost, "/volumes/"+vol+"/attach", attach).ID)
							pick(0).completed(pick(2).submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
							pick(1).completed(pick(0).submit(http.MethodDelete, "/volumes/"+vol, nil).ID)
						}
					})
				}
				wg.Wait()
				ops += clients * lifecycles * 4
			}
			b.ReportMetric(float64(ops)/time.Since(start).Seconds(), "ops/s")
		})
	}
}
