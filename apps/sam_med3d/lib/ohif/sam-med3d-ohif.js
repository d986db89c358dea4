/*
 * SAM-Med3D additions to the OHIF bundled with MONAI Label 0.8.5 (served after the bundle's app-config.js).
 *
 * The bundle's MONAI Label panel is patched (lib/ohif/__init__.py, CHUNK_PATCHES) to call window.samMed3d at
 * a few points; everything the additions do is here:
 *
 * - saveLabel(panel): the "Save Label" button. Sends what the viewer shows (OHIF's label map, segment indices
 *   as OHIF numbers them, voxels in the viewer's order) as the image's final label, in the request shape of
 *   MONAI Label's OHIF client: PUT datastore/label?image=<series>&tag=final, file "label" = label.bin,
 *   params = {"label_info": [{"name", "idx", "color"}]}. The server maps the segments to its labels by name
 *   and writes each segment's colour in the viewer as the SEG's recommended display colour.
 * - autoConnect(panel): connects the panel to the server in the cookie once the study is in the viewports, so
 *   a Next Sample (which opens another study) never leaves the panel disconnected.
 * - strategy / rememberStrategy: the Strategy drop-down's choice, kept for the page opened by Next Sample.
 * - openNextSample(info): opens the study the strategy chose in the same page (no reload, no dialog, no
 *   confirmation).
 * - watchTraining(tab) / trainingView(tab): the training state shown in the panel, polled from the server
 *   (GET train/ for the task state, GET info/ for the epoch and the accuracy).
 */
(function () {
  'use strict';

  const STRATEGY_KEY = 'samMed3d.strategy';
  const POLL_MS = 2000;

  function notify(message, type, duration) {
    const services = window.services;
    if (services && services.uiNotificationService) {
      services.uiNotificationService.show({
        title: 'MONAI Label', message: message, type: type || 'info', duration: duration || 4000,
      });
    }
  }

  function serverUrl(panel) {
    return panel.client().server_url;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail || body);
    } catch (err) {
      return response.status + ' ' + response.statusText;
    }
  }

  // ------------------------------------------------------------------------------------------------- save
  /** The colour [r, g, b] the viewport draws a segment in (null when unknown). */
  function segmentColour(viewportId, idx) {
    try {
      const colour = window.cornerstoneTools.segmentation.config.color.getSegmentIndexColor(viewportId, '1', idx);
      return colour ? [colour[0], colour[1], colour[2]].map(Math.round) : null;
    } catch (err) {
      return null;
    }
  }

  /** The viewer's label map and the segments it holds: {data: Uint8Array, labelInfo: [{name, idx, color}]}. */
  function viewerLabelMap(viewportId) {
    const segmentationService = window.services.segmentationService;
    const volume = segmentationService.getLabelmapVolume('1');
    const segmentation = segmentationService.getSegmentation('1');
    if (!volume || !segmentation) {
      return null;
    }
    let data = volume.voxelManager.getCompleteScalarDataArray();
    if (!(data instanceof Uint8Array)) {
      data = Uint8Array.from(data);
    }
    const counts = new Uint32Array(256);
    for (let i = 0; i < data.length; i++) {
      counts[data[i]]++;
    }
    const labelInfo = [];
    for (let idx = 1; idx < 256; idx++) {
      if (!counts[idx]) {
        continue;
      }
      const segment = segmentation.segments[idx];
      const entry = {name: segment ? segment.label : 'segment ' + idx, idx: idx};
      const colour = viewportId ? segmentColour(viewportId, idx) : null;
      if (colour) {
        entry.color = colour;
      }
      labelInfo.push(entry);
    }
    return {data: data, labelInfo: labelInfo};
  }

  async function saveLabel(panel) {
    const {viewport, displaySet} = panel.getActiveViewportInfo();
    const viewer = viewerLabelMap(viewport.viewportId);
    if (!viewer || !viewer.labelInfo.length) {
      return saveServerMasks(panel, displaySet.SeriesInstanceUID);
    }
    const url = new URL('datastore/label', serverUrl(panel));
    url.searchParams.append('image', displaySet.SeriesInstanceUID);
    url.searchParams.append('tag', 'final');
    const form = new FormData();
    form.append('params', JSON.stringify({label_info: viewer.labelInfo}));
    form.append('label', new Blob([viewer.data]), 'label.bin');
    const started = performance.now();
    const response = await fetch(url.toString(), {method: 'PUT', body: form});
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (!response.ok) {
      notify('Save failed: ' + (await errorText(response)), 'error', 10000);
      return {ok: false, status: response.status};
    }
    const names = viewer.labelInfo.map(s => s.name).join(', ');
    notify('Saved as the final label (' + names + ') in ' + seconds + ' s', 'success', 5000);
    return {ok: true, status: response.status, labels: viewer.labelInfo};
  }

  /**
   * Save the masks the server keeps for this image from this browser's clicks (MONAI Label's save_label infer
   * request, with no clicks): what an annotator clicked on an image and left unsaved (Next Sample, another
   * study) is gone from the viewer when the image is opened again, but not from the server, also after new
   * weights were published. Used by Save Label when the viewer shows no label.
   */
  async function saveServerMasks(panel, seriesUid) {
    const url = new URL('infer/sam_med3d', serverUrl(panel));
    url.searchParams.append('image', seriesUid);
    url.searchParams.append('output', 'json');
    const form = new FormData();
    form.append('params', JSON.stringify({save_label: true, label_tag: 'final'}));
    const response = await fetch(url.toString(), {method: 'POST', body: form});
    if (!response.ok) {
      notify('Nothing to save: no label is drawn on this image (' + (await errorText(response)) + ')', 'error',
             8000);
      return {ok: false, status: response.status, fromServer: true};
    }
    const body = await response.json();
    const names = Object.keys(body.label_names || {}).filter(name => name !== 'background');
    notify('Saved the masks the server kept for this image (' + names.join(', ') + ') as the final label',
           'success', 6000);
    return {ok: true, status: response.status, fromServer: true, labels: names};
  }

  // ------------------------------------------------------------------------------------------- connecting
  function viewportReady(panel) {
    try {
      const {displaySet} = panel.getActiveViewportInfo();
      if (!displaySet || !window.cornerstone) {
        return false;
      }
      return window.cornerstone.getEnabledElements().some(ee => {
        const data = ee.viewport.getImageData && ee.viewport.getImageData();
        return !!(data && data.dimensions);
      });
    } catch (err) {
      return false;
    }
  }

  function hasSegmentation() {
    try {
      return !!window.services.segmentationService.getLabelmapVolume('1');
    } catch (err) {
      return false;
    }
  }

  function autoConnect(panel) {
    const deadline = Date.now() + 300000;
    let connects = 0;
    let connectedAt = 0;
    const attempt = () => {
      if (Date.now() > deadline) {
        return;
      }
      if (panel.state.isDataReady) {
        // Connecting creates the panel's segmentation; a viewport still settling can drop that request, so
        // connect again (the panel creates only what is missing) until the segmentation is there.
        if (hasSegmentation() || connects >= 5) {
          return;
        }
        if (Date.now() - connectedAt > 10000) {
          connects++;
          connectedAt = Date.now();
          panel.settings.current.onConnect();
        }
      } else if (panel.settings.current && viewportReady(panel) && Date.now() - connectedAt > 5000) {
        connects++;
        connectedAt = Date.now();
        panel.settings.current.onConnect();
      }
      setTimeout(attempt, 500);
    };
    setTimeout(attempt, 500);
  }

  // ------------------------------------------------------------------------------------- active learning
  function strategy(strategies) {
    const names = Object.keys(strategies || {});
    const remembered = window.sessionStorage.getItem(STRATEGY_KEY);
    if (remembered && names.includes(remembered)) {
      return remembered;
    }
    return names.includes('random') || !names.length ? 'random' : names[0];
  }

  function rememberStrategy(name) {
    window.sessionStorage.setItem(STRATEGY_KEY, name);
  }

  function openNextSample(info) {
    if (!info || !info.StudyInstanceUID) {
      notify('Next Sample: the server named no study (all images may be labelled)', 'warning', 6000);
      return;
    }
    const url = new URL(window.location.href);
    url.searchParams.set('StudyInstanceUIDs', info.StudyInstanceUID);
    if (url.toString() === window.location.href) {
      notify('Next Sample: the strategy chose this study again (' + (info.SeriesInstanceUID || '') + ')', 'info');
      return;
    }
    // OHIF's own router (its navigateHistory command) opens the study in this page: the mode route re-reads
    // the URL, loads the study and mounts the panels again (autoConnect connects the new panel), with no page
    // reload. A full load is the fallback where the command is missing.
    // The point prompts placed on this study mean nothing on the next one, and the annotation state outlives
    // an in-page navigation: drop them.
    try {
      const state = window.cornerstoneTools.annotation.state;
      state.getAllAnnotations().filter(a => a.metadata && a.metadata.toolName === 'ProbeMONAILabel')
        .forEach(a => state.removeAnnotation(a.annotationUID));
    } catch (err) {
      // no cornerstone tools yet: nothing placed
    }
    const base = ((window.config && window.config.routerBasename) || '/').replace(/\/$/, '');
    const path = url.pathname.startsWith(base + '/') ? url.pathname.slice(base.length) : url.pathname;
    try {
      window.commandsManager.runCommand('navigateHistory', {to: path + url.search});
    } catch (err) {
      window.location.assign(url.toString());
    }
  }

  // ---------------------------------------------------------------------------------------------- training
  async function getJson(url) {
    const response = await fetch(url.toString());
    return response.ok ? response.json() : null;
  }

  async function refreshTraining(tab) {
    const base = tab.props.client().server_url;
    let task = null;
    try {
      task = await getJson(new URL('train/', base));
    } catch (err) {
      return;
    }
    const previous = tab.state.trainTask;
    const finished = previous && previous.status === 'RUNNING' && task && task.status !== 'RUNNING';
    let stats = tab.state.trainStats;
    if ((task && task.status === 'RUNNING') || finished || stats === undefined) {
      try {
        const info = await getJson(new URL('info/', base));
        stats = info && info.train_stats ? Object.values(info.train_stats)[0] || null : null;
      } catch (err) {
        stats = stats || null;
      }
    }
    tab.setState({trainTask: task, trainStats: stats, training: !!(task && task.status === 'RUNNING')});
  }

  function watchTraining(tab) {
    refreshTraining(tab);
    const timer = setInterval(() => {
      if (!document.body.contains(document.getElementById('samMed3dTraining'))) {
        clearInterval(timer);
        return;
      }
      refreshTraining(tab);
    }, POLL_MS);
  }

  function percent(value) {
    return Math.round(100 * value) + '%';
  }

  /** The Training and Train Acc rows: {training, trainingTip, accuracy, accuracyTip}. */
  function trainingView(tab) {
    const task = tab.state.trainTask;
    const stats = tab.state.trainStats;
    const accuracyOf = s => (s && typeof s.best_metric === 'number' && s.best_metric >= 0 ? percent(s.best_metric) : '-');
    if (!task) {
      return {training: 'Idle', trainingTip: 'No training has run on this server yet',
              accuracy: accuracyOf(stats), accuracyTip: 'best validation metric of the last training'};
    }
    // Stats written by this run (the file keeps the previous run's until the first epoch ends).
    const startTs = Date.parse(task.start_ts || '') / 1000;
    const current = stats && (!startTs || !stats.start_ts || stats.start_ts >= startTs - 5) ? stats : null;
    const total = current && current.total_epochs ? current.total_epochs : null;
    const epoch = current && current.epoch ? current.epoch : 0;
    if (task.status === 'RUNNING') {
      const text = total ? 'Epoch ' + epoch + '/' + total + ' (' + percent(epoch / total) + ')' : 'Starting';
      return {training: 'Running: ' + text, trainingTip: 'training runs; Stop Training ends it',
              accuracy: accuracyOf(current), accuracyTip: 'best validation metric so far'};
    }
    const words = {DONE: 'Done', STOPPED: 'Stopped', ERROR: 'Failed', QUEUED: 'Queued', SUBMITTED: 'Starting'};
    const state = words[task.status] || task.status;
    const epochs = total ? ' after ' + epoch + '/' + total + ' epochs' : '';
    return {training: state + epochs, trainingTip: 'the last training: ' + state.toLowerCase(),
            accuracy: accuracyOf(current || stats), accuracyTip: 'best validation metric of the last training'};
  }

  function addStyle() {
    // With Active Learning open, the organ list ran below the window, where the side panel's container hides
    // it: the panel becomes a column whose sections take the height left under its header and scroll inside
    // it. The progress texts were white on the bars' white background.
    const style = document.createElement('style');
    style.textContent = '.monaiLabelPanel { display: flex; flex-direction: column; overflow: hidden; }\n' +
      '.monaiLabelPanel > * { flex-shrink: 0; }\n' +
      '.monaiLabelPanel > .tabs.scrollbar { flex: 1 1 auto; min-height: 0; max-height: none; overflow-y: auto; }\n' +
      '.monaiLabelPanel .w3-container { color: #111; padding: 0 4px; }';
    document.head.appendChild(style);
  }
  if (document.head) {
    addStyle();
  } else {
    document.addEventListener('DOMContentLoaded', addStyle);
  }

  window.samMed3d = {
    saveLabel: saveLabel,
    viewerLabelMap: viewerLabelMap,
    autoConnect: autoConnect,
    strategy: strategy,
    rememberStrategy: rememberStrategy,
    openNextSample: openNextSample,
    watchTraining: watchTraining,
    refreshTraining: refreshTraining,
    trainingView: trainingView,
  };
})();
