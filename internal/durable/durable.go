// Package durable holds the file operations that the sidecar's append-only
// logs (the outbound queue's ack log, the inbound replay log) share: making
// a file's new contents and a directory's entries survive a crash.
package durable

import (
	"fmt"
	"os"
	"path/filepath"
)

// Replace makes path hold exactly data, so that after a crash it holds
// either its old contents or data, whole: data goes to path+".tmp", which is
// fsynced, renamed over path, and the directory fsynced. It returns path
// opened for appending (mode 0600 when created).
func Replace(path string, data []byte) (*os.File, error) {
	tmp := path + ".tmp"
	err := writeSynced(tmp, data)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = SyncDir(filepath.Dir(path))
	}
	var f *os.File
	if err == nil {
		f, err = os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	}
	if err != nil {
		os.Remove(tmp)
		return nil, err
	}
	return f, nil
}

func writeSynced(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if e := f.Close(); err == nil {
		err = e
	}
	return err
}

// SyncDir fsyncs a directory, making file creations, renames and removals
// in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("opening directory %s to sync it: %w", dir, err)
	}
	err = d.Sync()
	d.Close()
	if err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}
