package process

import (
	"errors"
	"os"
	"os/signal"

	"golang.org/x/sys/unix"
)

// Reaping.
//
// envd may be PID 1 of a VM, where every orphan of the guest becomes its child,
// or an ordinary process, where orphans would escape to the real init. Either way
// it must collect exactly the exit statuses it owns and leave no zombies, so:
//
//   - envd marks itself a child subreaper: orphaned grandchildren (a `cmd &` whose
//     shell exited) are reparented to envd instead of init;
//   - no code calls exec.Cmd.Wait; one goroutine (reap) waits for any child on
//     every SIGCHLD and hands the status to the registered process, or drops it
//     for an orphan;
//   - Start holds Service.mu across cmd.Start and registration, and reap holds it
//     across wait4, so a child that exits at once is never reaped before its pid
//     is known.
//
// Nothing else in envd may wait for children: reap would steal their statuses.

// startReaper makes envd a subreaper and starts the goroutine that collects
// exit statuses; Close stops it.
func (s *Service) startReaper() {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil && os.Getpid() != 1 {
		s.log.Warn("cannot become a child subreaper; orphaned grandchildren will be reaped by init", "err", err)
	}
	// A buffer of one is enough: each wake-up waits for every exited child.
	s.sigchld = make(chan os.Signal, 1)
	signal.Notify(s.sigchld, unix.SIGCHLD)
	// Children that exited before Notify (or zombies inherited as PID 1) are
	// collected by a first pass.
	select {
	case s.sigchld <- unix.SIGCHLD:
	default: // a real SIGCHLD is already queued
	}
	go s.reap()
}

// stopReaper stops the reaper goroutine and waits for it to return.
func (s *Service) stopReaper() {
	signal.Stop(s.sigchld)
	close(s.stopReap)
	<-s.reaperDone
}

func (s *Service) reap() {
	defer close(s.reaperDone)
	for {
		select {
		case <-s.sigchld:
		case <-s.stopReap:
			return
		}
		s.mu.Lock()
		s.waitAll()
		s.mu.Unlock()
	}
}

// waitAll collects every child that has exited. The caller holds s.mu.
func (s *Service) waitAll() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			// ECHILD: no children left; 0: the rest are still running.
			return
		}
		if p := s.procs[uint32(pid)]; p != nil && !p.hasExited() {
			p.markExited(ws)
		}
		// Anything else was an orphan reparented to envd: reaping it was the point.
	}
}
