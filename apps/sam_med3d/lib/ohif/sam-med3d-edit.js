/*
 * SAM-Med3D mask correction in OHIF's MONAI Label mode (served after sam-med3d-ohif.js, in app-config.js).
 *
 * - Brush / Eraser / Points: panel buttons under "Save Label" that make cornerstone's CircularBrush or
 *   CircularEraser (already in the mode's tool groups, never activated by the bundle) or the MONAI Label
 *   point tool the left-button tool, with a brush radius in mm. The brush paints the label chosen under
 *   Point Prompts.
 * - A click after an edit keeps the edit where the new mask does not change: the panel's updateView (which
 *   would replace every voxel of the clicked labels by the server's answer) is wrapped; the viewer remembers
 *   the server's previous answer, and a voxel takes the server's new value only where that answer changed
 *   it, else it keeps what the viewer showed (brush and eraser strokes included). docs/annotators.md says
 *   why this policy (benchmarks/edit_then_click.py measures it).
 * - Undo: takes back the last Run: its points are removed, and every voxel it changed goes back to what it
 *   was, unless painted or erased since. The server needs nothing: the next Run sends the remaining points;
 *   the predictor, seeing a point gone, replays the label's remaining points.
 */
(function () {
  'use strict';

  const PANEL_ID = 'samMed3dEdit';
  const MAX_UNDO = 20;
  const TOOLS = {points: 'ProbeMONAILabel', brush: 'CircularBrush', eraser: 'CircularEraser'};

  const state = {
    panel: null,
    modelMap: null,  // the server's last answer as the viewer numbers segments (no edits)
    undo: [],        // one entry per Run: {label, uids, index, before, after, modelIndex, modelBefore}
    tool: 'points',
    brushMm: 5,
  };

  function notify(message, type) {
    const services = window.services;
    if (services && services.uiNotificationService) {
      services.uiNotificationService.show({title: 'MONAI Label', message: message, type: type || 'info',
                                            duration: 4000});
    }
  }

  function labelmapVolume() {
    try {
      return window.services.segmentationService.getLabelmapVolume('1');
    } catch (err) {
      return null;
    }
  }

  function readMap(volume) {
    const data = volume.voxelManager.getCompleteScalarDataArray();
    return data instanceof Uint8Array ? data : Uint8Array.from(data);
  }

  function writeMap(volume, data) {
    volume.voxelManager.setCompleteScalarDataArray(data);
    window.cornerstoneTools.segmentation.triggerSegmentationEvents.triggerSegmentationDataModified('1');
  }

  function pointPrompts() {
    const panel = state.panel;
    return panel && panel.actions && panel.actions.pointprompts ? panel.actions.pointprompts.current : null;
  }

  function currentLabel() {
    const tab = pointPrompts();
    return tab && tab.state ? tab.state.currentLabel : null;
  }

  function segmentIndexOf(label) {
    const segmentation = window.services.segmentationService.getSegmentation('1');
    if (!segmentation || !label) {
      return 0;
    }
    for (const key of Object.keys(segmentation.segments)) {
      const segment = segmentation.segments[key];
      if (segment && segment.label === label) {
        return Number(key);
      }
    }
    return 0;
  }

  function pointUids() {
    const manager = window.cornerstoneTools.annotation.state.getAnnotationManager();
    const uids = [];
    const saved = manager.saveAnnotations(null, TOOLS.points) || {};
    for (const group of Object.values(saved)) {
      for (const annotation of (group[TOOLS.points] || [])) {
        uids.push(annotation.annotationUID);
      }
    }
    return uids;
  }

  /** Indices and values of `from` where it differs from `to`: {index: Uint32Array, values: Uint8Array}. */
  function difference(from, to) {
    let count = 0;
    for (let i = 0; i < from.length; i++) {
      if (from[i] !== to[i]) {
        count++;
      }
    }
    const index = new Uint32Array(count);
    const values = new Uint8Array(count);
    for (let i = 0, n = 0; i < from.length; i++) {
      if (from[i] !== to[i]) {
        index[n] = i;
        values[n++] = from[i];
      }
    }
    return {index: index, values: values};
  }

  // ------------------------------------------------------------------------------------ a click after an edit
  /**
   * Replaces the panel's updateView: the bundle's own update runs on the server's previous answer (so its
   * result is the server's new answer, segment-numbered as the viewer numbers them), then every voxel that
   * answer did not change keeps what the viewer showed.
   */
  function wrapUpdateView(panel) {
    const original = panel.updateView;
    if (!original || original.samMed3dWrapped) {
      return;
    }
    const wrapped = async function (response, modelId, labels, override, labelClassUnknown, sidx) {
      const volume = labelmapVolume();
      if (!volume) {
        return original(response, modelId, labels, override, labelClassUnknown, sidx);
      }
      const shown = readMap(volume).slice();
      const previous = state.modelMap && state.modelMap.length === shown.length ? state.modelMap
        : new Uint8Array(shown.length);
      writeMap(volume, previous.slice());
      try {
        await original(response, modelId, labels, override, labelClassUnknown, sidx);
      } catch (err) {
        writeMap(volume, shown);
        throw err;
      }
      const answer = readMap(volume).slice();
      const merged = new Uint8Array(shown.length);
      for (let i = 0; i < merged.length; i++) {
        merged[i] = answer[i] !== previous[i] ? answer[i] : shown[i];
      }
      writeMap(volume, merged);
      const changed = difference(shown, merged);
      const model = difference(previous, answer);
      state.undo.push({label: currentLabel(), uids: pointUids(), index: changed.index, before: changed.values,
                       after: Uint8Array.from(changed.index, i => merged[i]), modelIndex: model.index,
                       modelBefore: model.values});
      if (state.undo.length > MAX_UNDO) {
        state.undo.shift();
      }
      state.modelMap = answer;
      renderPanel();
    };
    wrapped.samMed3dWrapped = true;
    panel.updateView = wrapped;
    panel.forceUpdate();  // the tabs get updateView as a prop at render time
  }

  // -------------------------------------------------------------------------------------------------- undo
  function undo() {
    const entry = state.undo[state.undo.length - 1];
    const volume = labelmapVolume();
    if (!entry || !volume) {
      notify('Nothing to undo', 'warning');
      return false;
    }
    if (entry.label && entry.label !== currentLabel()) {
      notify('The last Run was on ' + entry.label + ': choose it under Point Prompts to undo it', 'warning');
      return false;
    }
    state.undo.pop();
    const same = state.undo.filter(e => e.label === entry.label);
    const earlier = same.length ? same[same.length - 1].uids : [];
    const manager = window.cornerstoneTools.annotation.state;
    for (const uid of entry.uids) {
      if (!earlier.includes(uid)) {
        manager.removeAnnotation(uid);
      }
    }
    const data = readMap(volume).slice();
    for (let n = 0; n < entry.index.length; n++) {
      const i = entry.index[n];
      if (data[i] === entry.after[n]) {  // not painted or erased since: back to before the Run
        data[i] = entry.before[n];
      }
    }
    writeMap(volume, data);
    if (state.modelMap) {
      for (let n = 0; n < entry.modelIndex.length; n++) {
        state.modelMap[entry.modelIndex[n]] = entry.modelBefore[n];
      }
    }
    try {
      window.services.cornerstoneViewportService.getRenderingEngine().render();
    } catch (err) {
      // nothing shown yet
    }
    renderPanel();
    return true;
  }

  // ----------------------------------------------------------------------------------------------- tools
  function toolGroups() {
    const service = window.services.toolGroupService;
    return service.getToolGroupIds().map(id => service.getToolGroup(id))
      .filter(group => group && group.hasTool && group.hasTool(TOOLS.brush));
  }

  function useTool(name) {
    if (name !== 'points') {
      const label = currentLabel();
      const index = segmentIndexOf(label);
      if (!label || label === 'background' || !index) {
        notify('Choose the label to correct under Point Prompts first', 'warning');
        return false;
      }
      window.cornerstoneTools.segmentation.segmentIndex.setActiveSegmentIndex('1', index);
    }
    for (const group of toolGroups()) {
      for (const tool of Object.values(TOOLS)) {
        if (group.hasTool(tool) && group.getToolOptions(tool) && group.getToolOptions(tool).mode === 'Active') {
          group.setToolPassive(tool);
        }
      }
      group.setToolActive(TOOLS[name], {bindings: [{mouseButton: 1}]});
      window.cornerstoneTools.utilities.segmentation.setBrushSizeForToolGroup(group.id, state.brushMm);
    }
    state.tool = name;
    renderPanel();
    return true;
  }

  function setBrushSize(mm) {
    const value = Math.max(0.5, Math.min(50, Number(mm) || state.brushMm));
    state.brushMm = value;
    for (const group of toolGroups()) {
      window.cornerstoneTools.utilities.segmentation.setBrushSizeForToolGroup(group.id, value);
    }
    renderPanel();
  }

  // ----------------------------------------------------------------------------------------- a saved SEG
  /*
   * In this mode every viewport is a volume (MPR) viewport. OHIF sends a SEG opened from the study list to
   * its SEG viewport, which renders the SEG display set on its own in that volume viewport: a SEG has no
   * volume (ViewportService._setVolumeViewport: "Volume display set not found"), setVolumes then reads
   * 'volumeId' of undefined, the route's Error Boundary catches it and the scan turns black. Here a SEG
   * never reaches a viewport: the viewports keep the scan, and the SEG's frames are written into the
   * panel's label map, each segment by its name under the panel's segment of that name (so in the colours
   * the panel draws the server's labels in), each frame on the slice of the instance it references.
   */
  function inThisMode() {
    return window.location.pathname.indexOf('/monai-label') >= 0;
  }

  function segDisplaySet(uid) {
    const displaySet = window.services.displaySetService.getDisplaySetByUID(uid);
    return displaySet && displaySet.Modality === 'SEG' ? displaySet : null;
  }

  async function showSeg(seg) {
    const services = window.services;
    for (let waited = 0; !labelmapVolume() && waited < 120000; waited += 500) {
      await new Promise(resolve => setTimeout(resolve, 500));  // the panel connects once the scan is shown
    }
    const volume = labelmapVolume();
    if (!volume) {
      notify('Connect the MONAI Label panel before opening a saved label', 'warning');
      return false;
    }
    const auth = services.userAuthenticationService;
    await seg.load({headers: auth && auth.getAuthorizationHeader ? auth.getAuthorizationHeader() : {}});
    const referenced = services.displaySetService.getDisplaySetByUID(seg.referencedDisplaySetInstanceUID);
    const frames = new Uint8Array(seg.labelmapBufferArray[0]);
    // The bundle also made a segmentation of its own for the SEG: only the panel's is shown and saved.
    try {
      services.segmentationService.remove(seg.displaySetInstanceUID);
    } catch (err) {
      // not added
    }
    const imageIds = referenced.instances.map(instance => instance.imageId);
    const scan = window.cornerstone.cache.getVolumes().find(v => v.imageIds && v.imageIds.includes(imageIds[0]));
    if (!scan) {
      notify('The scan of this SEG is not shown', 'error');
      return false;
    }
    const sliceLength = volume.dimensions[0] * volume.dimensions[1];
    const table = new Uint8Array(256);
    const unknown = [];
    for (const info of seg.segMetadata.data.slice(1)) {
      if (!info) {
        continue;
      }
      const index = segmentIndexOf(info.SegmentLabel);
      if (index) {
        table[Number(info.SegmentNumber)] = index;
      } else {
        unknown.push(info.SegmentLabel);
      }
    }
    const data = new Uint8Array(volume.voxelManager.getCompleteScalarDataArray().length);
    for (let n = 0; n < imageIds.length; n++) {
      const k = scan.imageIds.indexOf(imageIds[n]);
      if (k < 0) {
        continue;
      }
      const frame = frames.subarray(n * sliceLength, (n + 1) * sliceLength);
      const slice = data.subarray(k * sliceLength, (k + 1) * sliceLength);
      for (let i = 0; i < sliceLength; i++) {
        slice[i] = table[frame[i]];
      }
    }
    writeMap(volume, data);
    state.modelMap = null;
    state.undo = [];
    renderPanel();
    notify('Showing the saved label ' + (seg.SeriesDescription || '') +
           (unknown.length ? ' (segments not labels of this server: ' + unknown.join(', ') + ')' : ''),
           unknown.length ? 'warning' : 'success');
    return true;
  }

  function wrapViewportGrid() {
    const grid = window.services && window.services.viewportGridService;
    if (!grid || grid.samMed3dWrapped) {
      return;
    }
    const original = grid.setDisplaySetsForViewports.bind(grid);
    grid.setDisplaySetsForViewports = function (viewports) {
      if (!inThisMode() || !Array.isArray(viewports)) {
        return original(viewports);
      }
      const segs = [];
      const kept = viewports.filter(viewport => {
        const uids = viewport.displaySetInstanceUIDs || [];
        const found = uids.map(segDisplaySet).filter(Boolean);
        segs.push(...found);
        return !found.length;
      });
      if (segs.length) {
        const seg = segs[segs.length - 1];
        state.segLoad = showSeg(seg).catch(err => {
          console.error('SAM-Med3D: the SEG could not be shown', err);
          notify('The saved label could not be shown: ' + err.message, 'error');
          return false;
        });
      }
      return kept.length ? original(kept) : Promise.resolve();
    };
    grid.samMed3dWrapped = true;
  }

  // ----------------------------------------------------------------------------------------------- panel
  function button(id, text, title, onClick, active) {
    const element = document.createElement('button');
    element.id = id;
    element.textContent = text;
    element.title = title;
    element.style.cssText = 'flex: 1 1 auto; margin: 2px 1px; padding: 1px 4px; border-radius: 4px; color: black; ' +
      'font-size: 13px; background-color: ' + (active ? '#5acce6' : 'lightgray');
    element.addEventListener('click', onClick);
    return element;
  }

  function renderPanel() {
    const box = document.getElementById(PANEL_ID);
    if (!box) {
      return;
    }
    box.replaceChildren(
      button('samMed3dPoints', 'Points', 'Left click places point prompts (Run segments)', () => useTool('points'),
             state.tool === 'points'),
      button('samMed3dBrush', 'Brush', 'Left drag paints the label chosen under Point Prompts',
             () => useTool('brush'), state.tool === 'brush'),
      button('samMed3dEraser', 'Eraser', 'Left drag erases (back to background)', () => useTool('eraser'),
             state.tool === 'eraser'),
      button('samMed3dUndo', 'Undo', 'Take back the last Run (its points and its change to the mask)', undo,
             false));
    const size = document.createElement('label');
    size.style.cssText = 'margin-left: 4px; font-size: 12px; white-space: nowrap;';
    size.textContent = 'mm ';
    size.title = 'brush and eraser radius in mm';
    const input = document.createElement('input');
    input.id = 'samMed3dBrushSize';
    input.type = 'number';
    input.min = '0.5';
    input.max = '50';
    input.step = '0.5';
    input.value = String(state.brushMm);
    input.style.cssText = 'width: 40px; color: black;';
    input.addEventListener('change', evt => setBrushSize(evt.target.value));
    size.appendChild(input);
    box.appendChild(size);
    const undoButton = box.querySelector('#samMed3dUndo');
    undoButton.disabled = !state.undo.length;
    undoButton.textContent = state.undo.length ? 'Undo (' + state.undo.length + ')' : 'Undo';
  }

  function ensurePanel() {
    const save = document.getElementById('samMed3dSave');
    if (!save || document.getElementById(PANEL_ID)) {
      return;
    }
    const box = document.createElement('div');
    box.id = PANEL_ID;
    box.style.cssText = 'display: flex; flex-wrap: nowrap; align-items: center; margin-top: 4px;';
    save.insertAdjacentElement('afterend', box);
    renderPanel();
  }

  function attach(panel) {
    if (state.panel !== panel) {
      state.panel = panel;
      state.modelMap = null;
      state.undo = [];
      state.tool = 'points';
    }
    wrapUpdateView(panel);
    wrapViewportGrid();
    ensurePanel();
  }

  const observer = new MutationObserver(() => {
    ensurePanel();
    wrapViewportGrid();
  });
  function observe() {
    observer.observe(document.body, {childList: true, subtree: true});
  }
  if (document.body) {
    observe();
  } else {
    document.addEventListener('DOMContentLoaded', observe);
  }

  const samMed3d = window.samMed3d = window.samMed3d || {};
  const autoConnect = samMed3d.autoConnect;
  samMed3d.autoConnect = function (panel) {
    attach(panel);
    return autoConnect ? autoConnect(panel) : undefined;
  };
  samMed3d.edit = {attach: attach, undo: undo, useTool: useTool, setBrushSize: setBrushSize, showSeg: showSeg,
                   state: state};
})();
