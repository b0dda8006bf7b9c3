package correlate_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/volumed/volumed/correlate"
)

// TestResized: a resize in CloudStack grows the volume's loop device (a
// real change uevent); Resized returns once the device shows the new
// size, and times out, saying what it saw, on a size never reached.
func TestResized(t *testing.T) {
	e := setup(t, false, 5*time.Second)
	id, m := e.attachAndCorrelate(t, 1)
	p := e.cs.Volume.NewResizeVolumeParams(id)
	p.SetSize(3)
	if _, err := e.cs.Volume.ResizeVolume(p); err != nil {
		t.Fatalf("resizeVolume: %v", err)
	}
	got, err := e.corr.Resized(context.Background(), m, 3*gb)
	if err != nil || got != 3*gb {
		t.Fatalf("Resized = %d, %v; want %d", got, err, 3*gb)
	}

	got, err = e.corr.Resized(context.Background(), m, 5*gb)
	if !errors.Is(err, correlate.ErrTimeout) || got != 3*gb {
		t.Fatalf("Resized to a size never reached = %d, %v; want ErrTimeout and %d", got, err, 3*gb)
	}
}
