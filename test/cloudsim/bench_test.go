package cloudsim_test

import (
	"testing"

	"github.com/volumed/volumed/test/cloudsim"
)

// BenchmarkListVolumes measures one signed listVolumes round trip through
// cloudstack-go over loopback HTTP, with 50 volumes in the simulator.
func BenchmarkListVolumes(b *testing.B) {
	s := startSim(b, cloudsim.Config{})
	cs := syncClient(s)
	for i := range 50 {
		if _, err := cs.Volume.CreateVolume(createParams(cs, "bench-"+string(rune('a'+i%26)), 1)); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := cs.Volume.ListVolumes(cs.Volume.NewListVolumesParams()); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCreateVolume measures the createVolume HTTP call (state saved
// atomically to disk on each call).
func BenchmarkCreateVolume(b *testing.B) {
	s := startSim(b, cloudsim.Config{})
	cs := syncClient(s)
	p := createParams(cs, "bench", 1)
	for b.Loop() {
		if _, err := cs.Volume.CreateVolume(p); err != nil {
			b.Fatal(err)
		}
	}
}
