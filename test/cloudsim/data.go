package cloudsim

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
)

// MaxDataRead bounds one read of a volume's data through ReadVolume or
// the control endpoint.
const MaxDataRead = 64 << 20

// Errors of WriteVolume and ReadVolume.
var (
	// ErrNoVolume: no such volume, or it was deleted.
	ErrNoVolume = errors.New("cloudsim: no such volume")
	// ErrNoData: the volume is Allocated and has no data yet.
	ErrNoData = errors.New("cloudsim: volume is Allocated and has no data yet")
	// ErrOutOfRange: the range is not inside the volume.
	ErrOutOfRange = errors.New("cloudsim: range outside the volume")
)

// WriteVolume writes b at offset into the volume's data (its backing file),
// as a VM writing to the disk would; a loop device of the volume then
// reads the new data. It stands in for the test VM in tests.
func (s *Sim) WriteVolume(volumeID string, offset int64, b []byte) error {
	s.execMu.Lock()
	defer s.execMu.Unlock()
	v, err := s.dataVolume(volumeID, offset, int64(len(b)))
	if err != nil {
		return err
	}
	backing, err := s.ensureBacking(v)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(backing, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("cloudsim: write volume %s: %w", volumeID, err)
	}
	_, err = f.WriteAt(b, offset)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("cloudsim: write volume %s: %w", volumeID, err)
	}
	s.flushLoop(v)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.st.save(s.cfg.StateDir); err != nil { // a new backing file
		return fmt.Errorf("cloudsim: %w", err)
	}
	return nil
}

// ReadVolume reads n bytes at offset of the volume's data (at most
// MaxDataRead); a volume without a backing file yet reads zeros. Data
// written through the volume's loop device is flushed first.
func (s *Sim) ReadVolume(volumeID string, offset, n int64) ([]byte, error) {
	s.execMu.Lock()
	defer s.execMu.Unlock()
	if n > MaxDataRead {
		return nil, fmt.Errorf("%w: read of %d bytes exceeds %d", ErrOutOfRange, n, MaxDataRead)
	}
	v, err := s.dataVolume(volumeID, offset, n)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	backing := v.BackingFile
	s.mu.Unlock()
	b := make([]byte, n)
	if backing == "" {
		return b, nil
	}
	s.flushLoop(v)
	f, err := os.Open(backing)
	if err != nil {
		return nil, fmt.Errorf("cloudsim: read volume %s: %w", volumeID, err)
	}
	defer f.Close()
	if _, err := f.ReadAt(b, offset); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("cloudsim: read volume %s: %w", volumeID, err)
	}
	return b, nil
}

// dataVolume checks a data access of n bytes at offset; execMu is held.
func (s *Sim) dataVolume(id string, offset, n int64) (*volume, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.st.Volumes[id]
	switch {
	case !ok || v.Removed:
		return nil, fmt.Errorf("%w: %s", ErrNoVolume, id)
	case v.State == volAllocated:
		return nil, fmt.Errorf("%w: %s", ErrNoData, id)
	case offset < 0 || n < 0 || offset+n > v.Size:
		return nil, fmt.Errorf("%w: %d bytes at %d, volume size %d", ErrOutOfRange, n, offset, v.Size)
	}
	return v, nil
}

// serveData is /_sim/volumes/{id}/data: PUT writes the body at ?offset=N
// (WriteVolume), GET reads ?length=N bytes at ?offset=N (ReadVolume).
func (s *Sim) serveData(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	offset, err := queryInt(r, "offset", 0)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	switch r.Method {
	case http.MethodPut:
		b, err := io.ReadAll(io.LimitReader(r.Body, MaxDataRead+1))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if len(b) > MaxDataRead {
			http.Error(w, fmt.Sprintf("body exceeds %d bytes", MaxDataRead), http.StatusRequestEntityTooLarge)
			return
		}
		if err := s.WriteVolume(id, offset, b); err != nil {
			http.Error(w, err.Error(), dataStatus(err))
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case http.MethodGet:
		n, err := queryInt(r, "length", -1)
		if err == nil && n < 0 {
			err = errors.New("length is required")
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		b, err := s.ReadVolume(id, offset, n)
		if err != nil {
			http.Error(w, err.Error(), dataStatus(err))
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(b)
	default:
		w.Header().Set("Allow", "GET, PUT")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	}
}

// queryInt reads an integer query parameter; def when absent.
func queryInt(r *http.Request, name string, def int64) (int64, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%s %q is not a non-negative integer", name, v)
	}
	return n, nil
}

// dataStatus is the HTTP status of a data access error.
func dataStatus(err error) int {
	switch {
	case errors.Is(err, ErrNoVolume):
		return http.StatusNotFound
	case errors.Is(err, ErrNoData):
		return http.StatusConflict
	case errors.Is(err, ErrOutOfRange):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}
