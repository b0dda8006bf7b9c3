package csapi

import (
	"slices"
	"testing"
	"time"

	"github.com/volumed/volumed/test/cloudsim"
)

// BenchmarkWaitJobLatency measures how long after a simulator job finishes
// WaitJob returns (default PollMin/PollMax), for short and for the
// simulator's default 300 ms jobs. The job's end is seen by watching the
// simulator's pending-job count every 100 µs. Metrics: mean/p50/max latency
// in ms, polls per job.
func BenchmarkWaitJobLatency(b *testing.B) {
	for _, d := range []time.Duration{20 * time.Millisecond, 50 * time.Millisecond, cloudsim.DefaultJobDuration} {
		b.Run("job="+d.String(), func(b *testing.B) { benchWaitJob(b, d) })
	}
}

func benchWaitJob(b *testing.B, jobDuration time.Duration) {
	sim, c := startSim(b, jobDuration)
	ctx := ctxTimeout(b, 10*time.Minute)
	var lat []time.Duration
	var polls int64
	for b.Loop() {
		_, jobID, err := c.CreateVolume(ctx, CreateParams{Name: "bench", SizeGiB: 1,
			DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
		if err != nil {
			b.Fatal(err)
		}
		doneAt := make(chan time.Time, 1)
		go func() {
			for sim.Stats().PendingJobs > 0 && ctx.Err() == nil {
				time.Sleep(100 * time.Microsecond)
			}
			doneAt <- time.Now()
		}()
		before := c.Calls()
		if _, err := c.WaitJob(ctx, jobID); err != nil {
			b.Fatal(err)
		}
		returned := time.Now()
		polls += c.Calls() - before
		lat = append(lat, returned.Sub(<-doneAt))
	}
	slices.Sort(lat)
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(sum/time.Duration(len(lat))), "mean-ms")
	b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
	b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
	b.ReportMetric(float64(polls)/float64(len(lat)), "polls/job")
}
